"""The four benchmark formats as functions of a :class:`Scorer`, sharded over ranks.

When ``torch.distributed`` is initialised each data shard takes every n-th row of each
language (``rows[shard::n]``; the shard is the rank, or a training engine's data-parallel rank
when ranks share a model-parallel group), scores its share, and the per-language counts are
summed in one all-reduce per task, so every rank ends with the same numbers as a single
process would get. Bitext retrieval needs every embedding (it is a nearest-neighbour search over the whole
set), so the pooled states are all-gathered and put back in row order instead. With no process
group (or a group of one) nothing is communicated.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from eval.answers import extract_number, numbers_match
from eval.benchmarks import MgsmRow, ParallelPair, XcopaRow
from eval.scorer import Scorer, speaking
from methods.subspace import bitext_retrieval_accuracy
from model.layers import rank_world

T = TypeVar("T")

# XCOPA connectors per language (cause, effect): the premise is continued by "because" or
# "therefore" in its own language and each choice is scored as the continuation.
CONNECTORS: dict[str, tuple[str, str]] = {
    "en": ("because", "therefore"),
    "et": ("sest", "seetõttu"),
    "ht": ("poukisa", "donk sa"),
    "id": ("karena", "maka"),
    "it": ("perché", "quindi"),
    "qu": ("imataq", "chaymi"),
    "sw": ("kwa sababu", "kwa hiyo"),
    "ta": ("காரணமாக", "எனவே"),
    "th": ("เพราะ", "ดังนั้น"),
    "tr": ("çünkü", "bu yüzden"),
    "vi": ("bởi vì", "vì vậy"),
    "zh": ("因为", "所以"),
}
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th"})  # scripts written without word spaces
DEFAULT_MGSM_TEMPLATE = "{question}"
_FINAL_PUNCT = re.compile(r"[.。!！?？]+$")


@dataclass
class TaskResult:
    """One task's metric per language plus the raw counts it was computed from.

    ``counts[lang]`` holds summable quantities (correct/total, nll/tokens), which is what ranks
    reduce; ``details`` holds per-layer curves (bitext) and a few sample outputs.
    """

    task: str
    metric: str
    per_language: dict[str, float]
    counts: dict[str, dict[str, float]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "metric": self.metric,
            "per_language": self.per_language,
            "counts": self.counts,
            "details": self.details,
        }


# --------------------------------------------------------------------------------------------
# Ranks
# --------------------------------------------------------------------------------------------


Layout = tuple[int, int]  # (this rank's data shard, number of shards)


def data_layout(scorer: Any) -> Layout:
    """Which share of the rows this rank scores: the scorer's ``data_shard`` (an engine's
    data-parallel rank and size: ranks of one tensor/pipeline group score the same rows
    together) when it has one, else (rank, world)."""
    layout = getattr(scorer, "data_shard", None)
    return (int(layout[0]), int(layout[1])) if layout is not None else rank_world()


def shard(rows: Sequence[T], layout: Layout | None = None) -> list[T]:
    """This rank's rows: every n-th row starting at its shard (balanced within one row)."""
    index, count = layout or rank_world()
    return list(rows[index::count])


def _one_per_shard(local: Any, layout: Layout) -> list[Any]:
    """Every shard's ``local``, in shard order, taking one rank per shard (model-parallel
    replicas of a shard computed the same thing)."""
    parts: list[Any] = [None] * rank_world()[1]
    dist.all_gather_object(parts, (layout[0], local))
    by_shard: dict[int, Any] = {}
    for index, value in parts:
        by_shard.setdefault(index, value)
    if sorted(by_shard) != list(range(layout[1])):
        raise RuntimeError(f"data shards {sorted(by_shard)} do not cover 0..{layout[1] - 1}")
    return [by_shard[i] for i in range(layout[1])]


def all_reduce_sum(values: Sequence[float], layout: Layout | None = None) -> list[float]:
    """Element-wise sum over shards (float64: exact for counts, stable for log-likelihoods)."""
    _, world = rank_world()
    layout = layout or rank_world()
    if world == 1:
        return [float(v) for v in values]
    if layout[1] == world:  # one rank per shard: a plain all-reduce
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()
    parts = _one_per_shard([float(v) for v in values], layout)
    return torch.tensor(parts, dtype=torch.float64).sum(dim=0).tolist()


def gather_sharded(local: Sequence[T], total: int, layout: Layout | None = None) -> list[T]:
    """Undo :func:`shard`: every rank gets all ``total`` items back in their original order."""
    _, world = rank_world()
    layout = layout or rank_world()
    if world == 1:
        return list(local)
    parts = _one_per_shard(list(local), layout)
    count = layout[1]
    return [parts[i % count][i // count] for i in range(total)]


def _reduce_counts(
    local: Mapping[str, Mapping[str, float]],
    languages: Sequence[str],
    keys: Sequence[str],
    layout: Layout | None = None,
) -> dict[str, dict[str, float]]:
    flat = [local.get(lang, {}).get(k, 0.0) for lang in languages for k in keys]
    summed = all_reduce_sum(flat, layout)
    it = iter(summed)
    return {lang: {k: next(it) for k in keys} for lang in languages}


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def xcopa_request(
    row: XcopaRow, connectors: Mapping[str, tuple[str, str]] | None = None
) -> tuple[str, tuple[str, str]]:
    """(context, (continuation 1, continuation 2)) for one XCOPA row.

    "The man turned on the faucet" + " therefore" | " the toilet filled with water." The
    premise loses its final punctuation, the choice its initial capital (not for scripts
    without case), and languages written without spaces get none.
    """
    table = {**CONNECTORS, **(connectors or {})}
    cause, effect = table.get(row.lang, CONNECTORS["en"])
    sep = "" if row.lang in NO_SPACE_LANGUAGES else " "
    premise = _FINAL_PUNCT.sub("", row.premise.strip())
    context = premise + sep + (cause if row.question == "cause" else effect)

    def cont(choice: str) -> str:
        choice = choice.strip()
        return sep + choice[:1].lower() + choice[1:]

    return context, (cont(row.choice1), cont(row.choice2))


def mgsm_prompt(question: str, template: str = DEFAULT_MGSM_TEMPLATE) -> str:
    return template.format(question=question)


# --------------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------------


def evaluate_xcopa(
    scorer: Scorer,
    rows_by_lang: Mapping[str, Sequence[XcopaRow]],
    connectors: Mapping[str, tuple[str, str]] | None = None,
) -> TaskResult:
    """Accuracy of picking the choice with the higher summed log-likelihood (ties: choice 1)."""
    languages = sorted(rows_by_lang)
    layout = data_layout(scorer)
    local: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for lang in languages:
        rows = shard(rows_by_lang[lang], layout)
        requests: list[tuple[str, str]] = []
        for row in rows:
            context, choices = xcopa_request(row, connectors)
            requests += [(context, c) for c in choices]
        with speaking(scorer, lang):
            scores = scorer.loglikelihood(requests)
        correct = 0
        for n, row in enumerate(rows):
            first, second = scores[2 * n].logprob, scores[2 * n + 1].logprob
            pred = 0 if first >= second else 1
            correct += int(pred == row.label)
            if n < 3:
                samples.setdefault(lang, []).append(
                    {"idx": row.idx, "label": row.label, "pred": pred, "logprobs": [first, second]}
                )
        local[lang] = {"correct": float(correct), "total": float(len(rows))}
    counts = _reduce_counts(local, languages, ("correct", "total"), layout)
    return TaskResult("xcopa", "acc", _accuracy(counts), counts, {"samples": samples})


def evaluate_mgsm(
    scorer: Scorer,
    rows_by_lang: Mapping[str, Sequence[MgsmRow]],
    max_new_tokens: int = 256,
    template: str = DEFAULT_MGSM_TEMPLATE,
) -> TaskResult:
    """Exact numeric match of the last number in the greedy answer (``eval.answers``)."""
    languages = sorted(rows_by_lang)
    layout = data_layout(scorer)
    local: dict[str, dict[str, float]] = {}
    samples: dict[str, list[dict[str, Any]]] = {}
    for lang in languages:
        rows = shard(rows_by_lang[lang], layout)
        with speaking(scorer, lang):
            outputs = scorer.generate(
                [mgsm_prompt(r.question, template) for r in rows], max_new_tokens
            )
        correct = 0
        for n, (row, text) in enumerate(zip(rows, outputs, strict=True)):
            predicted = extract_number(text)
            correct += int(numbers_match(predicted, row.answer))
            if n < 3:
                samples.setdefault(lang, []).append(
                    {"idx": row.idx, "gold": row.answer, "predicted": predicted, "output": text}
                )
        local[lang] = {"correct": float(correct), "total": float(len(rows))}
    counts = _reduce_counts(local, languages, ("correct", "total"), layout)
    return TaskResult("mgsm", "acc", _accuracy(counts), counts, {"samples": samples})


def evaluate_bitext(
    scorer: Scorer, pairs_by_lang: Mapping[str, Sequence[ParallelPair]]
) -> TaskResult:
    """Per-layer retrieval accuracy in both directions on mean-pooled hidden states.

    ``details[lang]`` holds ``x2en`` (target sentence retrieves its English pair) and ``en2x``
    curves indexed by layer (0 = embeddings); the headline number is the best layer's mean
    of the two directions.
    """
    layout = data_layout(scorer)
    per_language: dict[str, float] = {}
    counts: dict[str, dict[str, float]] = {}
    details: dict[str, Any] = {}
    for lang in sorted(pairs_by_lang):
        pairs = list(pairs_by_lang[lang])
        if len(pairs) < 2:
            raise ValueError(
                f"bitext {lang}: need at least 2 pairs to retrieve among, got {len(pairs)}"
            )
        local = shard(pairs, layout)
        # Called on every rank, with or without a share: on a partitioned model a forward is a
        # collective.
        with speaking(scorer, "en"):
            en_states = scorer.hidden_states([p.en for p in local])
        with speaking(scorer, lang):
            tgt_states = scorer.hidden_states([p.target for p in local])
        rows = list(zip(en_states, tgt_states, strict=True))
        merged = gather_sharded(rows, len(pairs), layout)
        en = torch.stack([m[0] for m in merged])  # [N, L+1, D]
        tgt = torch.stack([m[1] for m in merged])
        # Centred per side: what a sentence shares with every other of its language (the
        # language offset, the huge-activation dimensions) says nothing about which one it is.
        layers = range(en.shape[1])
        x2en = [bitext_retrieval_accuracy(tgt[:, i], en[:, i], center=True) for i in layers]
        en2x = [bitext_retrieval_accuracy(en[:, i], tgt[:, i], center=True) for i in layers]
        mean = [(a + b) / 2 for a, b in zip(x2en, en2x, strict=True)]
        best = max(range(len(mean)), key=lambda layer: (mean[layer], -layer))
        per_language[lang] = mean[best]
        counts[lang] = {"pairs": float(len(pairs))}
        details[lang] = {"x2en": x2en, "en2x": en2x, "best_layer": best}
    return TaskResult("bitext", "acc", per_language, counts, details)


def evaluate_perplexity(scorer: Scorer, texts_by_lang: Mapping[str, Sequence[str]]) -> TaskResult:
    """Token-level perplexity exp(sum NLL / tokens) of each language's texts (whole texts).

    Per-token perplexity depends on how finely the tokenizer cuts a script (a byte-level
    tokenizer makes Chinese look easy), so ``details[lang]["bits_per_byte"]`` (NLL in bits per
    UTF-8 byte of text) is also given: it compares across languages and tokenizers.
    """
    languages = sorted(texts_by_lang)
    layout = data_layout(scorer)
    local: dict[str, dict[str, float]] = {}
    for lang in languages:
        texts = shard(texts_by_lang[lang], layout)
        with speaking(scorer, lang):
            scores = scorer.loglikelihood([("", t) for t in texts])
        local[lang] = {
            "nll": -sum(s.logprob for s in scores),
            "tokens": float(sum(s.num_tokens for s in scores)),
            "bytes": float(sum(len(t.encode("utf-8")) for t in texts)),
        }
    counts = _reduce_counts(local, languages, ("nll", "tokens", "bytes"), layout)
    per_language = {
        lang: math.exp(c["nll"] / c["tokens"]) if c["tokens"] else math.nan
        for lang, c in counts.items()
    }
    details = {
        lang: {"bits_per_byte": c["nll"] / (c["bytes"] * math.log(2)) if c["bytes"] else math.nan}
        for lang, c in counts.items()
    }
    return TaskResult("ppl", "ppl", per_language, counts, details)


def _accuracy(counts: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    return {
        lang: (c["correct"] / c["total"]) if c["total"] else math.nan for lang, c in counts.items()
    }
