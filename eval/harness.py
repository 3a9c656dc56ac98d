"""lm-evaluation-harness on a polyshift export: ``@register_model("polyshift")``.

Any lm-eval task runs on an export through our own scorer (``eval.scorer.HFScorer``: its
batching, tokenisation and, for a ShifCon export, its per-language ``shift`` hook), so lm-eval
numbers and ours come from the same forward. A ShifCon export is scored with its shift on, by
the language of each request: the ``lang`` model argument when given (``auto``: detect), else
the task name's (``xcopa_sw`` -> sw: a part that is one of the export's languages, else a final
two-letter part), else the language the export's detector finds for the prompt
(``ShiftedLM.detect``, nearest language centroid). A language without vectors stays unshifted,
as in our own tasks; a plain export is never shifted.

    import eval.harness  # registers "polyshift" with lm-eval
    lm_eval.simple_evaluate(model="polyshift", model_args="pretrained=runs/x/export,lang=sw",
                            tasks=[...], task_manager=eval.harness.task_manager(...))

or ``python -m launcher.evaluate --harness lm-eval`` (``run_tasks`` below).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from eval.scorer import HFScorer, load_model

T = TypeVar("T")
AUTO = "auto"
FEWSHOT_SEED = 1234  # simple_evaluate's default
_TWO_LETTERS = re.compile(r"^[a-z]{2}$")


def task_language(task_name: str | None, known: Sequence[str]) -> str | None:
    """The language a task name carries: a ``_``/``-`` part that is one of ``known`` (the last
    such), else a final two-letter part; None when the name says nothing."""
    parts = re.split(r"[_-]", task_name or "")
    for part in reversed(parts):
        if part in known:
            return part
    return parts[-1] if len(parts) > 1 and _TWO_LETTERS.match(parts[-1]) else None


@register_model("polyshift")
class PolyshiftLM(LM):
    """lm-eval's ``LM`` over an :class:`HFScorer`; ``shifted`` is the export's ``ShiftedLM``
    (its hooks are the scorer's ``shift``), None for a plain export or ``shift=False``."""

    def __init__(
        self,
        pretrained: str | os.PathLike | None = None,
        *,
        lang: str | None = None,
        shift: bool = True,
        batch_size: int | str = 8,
        max_length: int | None = None,
        dtype: str = "float32",
        attn: str = "sdpa",
        device: str | None = None,
        scorer: HFScorer | None = None,
        shifted: Any = None,
        **_: Any,  # lm-eval passes max_batch_size and friends to every model
    ) -> None:
        super().__init__()
        if scorer is None:
            if pretrained is None:
                raise ValueError("polyshift: model_args needs pretrained=EXPORT_DIR")
            scorer, shifted = build_scorer(
                pretrained, shift=shift, batch_size=_batch_size(batch_size),
                max_length=max_length, dtype=dtype, attn=attn, device=device,
            )  # fmt: skip
        self.scorer = scorer
        self.shifted = shifted
        self.lang = lang or None
        self.tokenizer = scorer.tokenizer

    @property
    def languages(self) -> list[str]:
        """Languages the export has vectors for (empty: nothing is ever shifted)."""
        return list(self.shifted.languages) if self.shifted is not None else []

    # -- languages -------------------------------------------------------------------------------

    def request_languages(self, task_names: Sequence[str | None], texts: Sequence[str]) -> list:
        """The shift language of each request (None: unshifted)."""
        if self.shifted is None:
            return [None] * len(texts)
        langs: list[str | None] = []
        undecided: list[int] = []
        for i, task in enumerate(task_names):
            lang = self.lang if self.lang != AUTO else None
            if lang is None and self.lang != AUTO:
                lang = task_language(task, self.languages)
            langs.append(lang)
            if lang is None:
                undecided.append(i)
        if undecided:
            found = self.detect([texts[i] for i in undecided])
            for i, lang in zip(undecided, found, strict=True):
                langs[i] = lang
        return langs

    def detect(self, texts: Sequence[str]) -> list[str]:
        """The export's detector in batches, once per distinct text (run unshifted)."""
        unique = list(dict.fromkeys(texts))
        size = self.scorer.batch_size
        found: list[str] = []
        for start in range(0, len(unique), size):
            found += self.shifted.detect(unique[start : start + size])
        by_text = dict(zip(unique, found, strict=True))
        return [by_text[t] for t in texts]

    def _by_language(
        self,
        requests: Sequence[Any],
        texts: Sequence[str],
        score: Callable[[list[int]], Sequence[T]],
        key: Callable[[int], Any] = lambda i: None,
    ) -> list[T]:
        """Run ``score`` on the request indices of each (language, key) group, with that
        language's shift on; results come back in request order."""
        langs = self.request_languages([getattr(r, "task_name", None) for r in requests], texts)
        groups: dict[tuple[Any, Any], list[int]] = {}
        for i, lang in enumerate(langs):
            groups.setdefault((lang, key(i)), []).append(i)
        out: list[Any] = [None] * len(requests)
        for (lang, _), indices in groups.items():
            with self.scorer.language(lang) if lang is not None else nullcontext():
                for i, result in zip(indices, score(indices), strict=True):
                    out[i] = result
        return out

    # -- lm-eval's LM ------------------------------------------------------------------------------

    def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
        pairs = [tuple(r.args) for r in requests]

        def score(indices: list[int]) -> list[tuple[float, bool]]:
            results = self.scorer.loglikelihood([pairs[i] for i in indices])
            return [(r.logprob, r.greedy) for r in results]

        return self._by_language(requests, [c or x for c, x in pairs], score)

    def loglikelihood_rolling(self, requests: Sequence[Any]) -> list[float]:
        """Whole-text log-likelihood in disjoint windows of ``max_length`` tokens (lm-eval's
        rolling scheme: every token predicted once, first one from BOS, else EOS)."""
        texts = [r.args[0] for r in requests]
        prefix = self.scorer.prefix_ids()
        if not prefix:
            raise ValueError("loglikelihood_rolling: the tokenizer has no BOS or EOS to start from")

        def score(indices: list[int]) -> list[float]:
            rows: list[tuple[list[int], int]] = []
            owner: list[int] = []
            for n, i in enumerate(indices):
                ids = self.tokenizer(texts[i], add_special_tokens=False)["input_ids"]
                windows = get_rolling_token_windows(ids, prefix[0], self.scorer.max_length, 1)
                for ctx, cont in map(make_disjoint_window, windows):
                    rows.append((list(ctx) + list(cont), len(cont)))
                    owner.append(n)
            totals = [0.0] * len(indices)
            for n, result in zip(owner, self.scorer.score_encoded(rows), strict=True):
                totals[n] += result.logprob
            return totals

        return self._by_language(requests, texts, score)

    def generate_until(self, requests: Sequence[Any]) -> list[str]:
        """Greedy answers cut at the task's ``until`` strings (``max_gen_toks``, default 256)."""
        prompts = [r.args[0] for r in requests]
        settings = [_greedy_settings(r.args[1] if len(r.args) > 1 else {}) for r in requests]

        def generate(indices: list[int]) -> list[str]:
            stop, max_new = settings[indices[0]]
            return self.scorer.generate([prompts[i] for i in indices], max_new, stop=stop)

        return self._by_language(requests, prompts, generate, key=lambda i: settings[i])

    # -- chat templates (lm-eval's --apply_chat_template) --------------------------------------

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "polyshift")).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )


def _batch_size(value: int | str) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        return 8  # no batch-size search: a fixed size, as our own tasks use
    return int(value)


def _greedy_settings(gen_kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    """(stop strings, max new tokens); sampling is refused rather than silently made greedy."""
    kwargs = dict(gen_kwargs or {})
    if kwargs.get("do_sample") and float(kwargs.get("temperature", 1.0) or 0.0) > 0:
        raise ValueError("polyshift: only greedy generation (do_sample: false) is supported")
    until = kwargs.get("until") or ()
    stop = (until,) if isinstance(until, str) else tuple(until)
    return stop, int(kwargs.get("max_gen_toks", 256))


def build_scorer(
    spec: str | os.PathLike,
    *,
    shift: bool = True,
    batch_size: int = 8,
    max_length: int | None = None,
    dtype: str = "float32",
    attn: str = "sdpa",
    device: str | None = None,
) -> tuple[HFScorer, Any]:
    """(scorer, ShiftedLM or None) for an export: lm-eval formats its own prompts, so the
    scorer encodes raw text (``chat=False``)."""
    import torch

    from methods.shifcon.infer import ShiftedLM
    from methods.shifcon.method import META_FILE, load_shifcon

    model, tokenizer = load_model(spec, dtype=getattr(torch, dtype), attn_implementation=attn,
                                  device=device)  # fmt: skip
    shifted = None
    if shift and (Path(spec) / META_FILE).is_file():
        meta, stats = load_shifcon(Path(spec))
        shifted = ShiftedLM(model, tokenizer, meta, stats)
    scorer = HFScorer(model, tokenizer, batch_size=batch_size, chat=False, max_length=max_length,
                      shift=shifted.hooks if shifted is not None else None)  # fmt: skip
    return scorer, shifted


# -- running tasks -------------------------------------------------------------------------------


def run_tasks(
    lm: LM,
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike,
    task_dir: str | os.PathLike,
    limit: int | None = None,
    max_new_tokens: int = 256,
    apply_chat_template: bool = False,
    system_instruction: str | None = None,
    manager: Any = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """lm-eval's ``evaluate`` on ``tasks``; returns (results as our ``TaskResult`` per
    benchmark, lm-eval's own results dict).

    Our benchmarks (``xcopa_<lang>``, ``mgsm_<lang>``) get task files in ``task_dir`` pointing
    at ``data_dir`` (``eval.lm_eval_tasks``); lm-eval's built-in task list (slow to index, and
    its datasets come from the hub) is only read when a task is not one of ours. This is
    ``simple_evaluate`` without its run report (git and ``torch.utils.collect_env`` probes
    start a dozen processes): tasks are zero-shot unless their config says otherwise.
    """
    from lm_eval.evaluator import evaluate

    if manager is None:  # else: the caller's, from task_manager() with the same arguments
        manager = task_manager(tasks, data_dir=data_dir, task_dir=task_dir,
                               max_new_tokens=max_new_tokens)  # fmt: skip
    loaded = manager.load(list(tasks))
    for task in loaded["tasks"].values():
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    raw = evaluate(
        lm=lm,
        task_dict=loaded,
        limit=limit,
        log_samples=True,
        apply_chat_template=apply_chat_template,
        system_instruction=system_instruction,
        bootstrap_iters=0,
    )
    if raw is None:  # a non-zero rank under lm-eval's own data parallelism
        return {}, {}
    return task_results(raw), raw


def task_manager(
    tasks: Sequence[str],
    *,
    data_dir: str | os.PathLike,
    task_dir: str | os.PathLike,
    max_new_tokens: int = 256,
) -> Any:
    """lm-eval's ``TaskManager`` that knows every one of ``tasks``: ours written to
    ``task_dir`` first; a name lm-eval does not know either raises ``BenchmarkError``
    (before any model is loaded)."""
    from lm_eval.tasks import TaskManager

    from eval.benchmarks import BenchmarkError
    from eval.lm_eval_tasks import write_tasks

    ours = write_tasks(tasks, data_dir, task_dir, max_new_tokens=max_new_tokens)
    manager = TaskManager(include_path=str(task_dir) if ours else None,
                          include_defaults=any(t not in ours for t in tasks))  # fmt: skip
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise BenchmarkError(f"lm-eval knows no task {', '.join(unknown)} (`lm_eval ls tasks`)")
    return manager


_METRICS = ("acc", "exact_match", "acc_norm", "f1", "word_perplexity")


def _headline(metrics: dict[str, Any]) -> tuple[str, str] | None:
    """(lm-eval key, our metric name): the first of ``_METRICS`` a task reports, else its first
    number that is not a standard error."""
    keys = [k for k, v in metrics.items() if "," in k and "_stderr" not in k
            and isinstance(v, int | float)]  # fmt: skip
    for name in _METRICS:
        for key in keys:
            if key.split(",")[0] == name:
                return key, name
    return (keys[0], keys[0].split(",")[0]) if keys else None


def task_results(raw: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results as our ``TaskResult`` per benchmark: ``xcopa_sw`` -> task xcopa,
    language sw (what the native path's table, MLflow metrics and charts expect); a task that
    names no language keeps its name with language ``all``."""
    from eval.lm_eval_tasks import split_task
    from eval.tasks import TaskResult

    out: dict[str, TaskResult] = {}
    groups = set(raw.get("groups", {}))
    for name, metrics in raw.get("results", {}).items():
        if name in groups or (picked := _headline(metrics)) is None:
            continue
        key, metric = picked
        task, lang = split_task(name) or _named(name)
        result = out.setdefault(name if task is None else task,
                                TaskResult(task or name, metric, {}))  # fmt: skip
        samples = raw.get("samples", {}).get(name, [])
        total = float(raw.get("n-samples", {}).get(name, {}).get("effective", len(samples)))
        result.per_language[lang] = float(metrics[key])
        counts = {"total": total}
        if samples and all(isinstance(s.get(metric), int | float) for s in samples):
            counts["correct"] = float(sum(s[metric] for s in samples))
        result.counts[lang] = counts
        result.details.setdefault("samples", {})[lang] = [_sample(s) for s in samples[:3]]
        result.details.setdefault("lm_eval_task", {})[lang] = name
    return out


def _named(name: str) -> tuple[str | None, str]:
    lang = task_language(name, ())
    return (name.rsplit("_", 1)[0], lang) if lang else (None, "all")


def _sample(sample: dict[str, Any]) -> dict[str, Any]:
    """A logged sample in the native layout (idx, label, pred, logprobs / output)."""
    row: dict[str, Any] = {"idx": sample.get("doc_id"), "target": sample.get("target")}
    resps = sample.get("filtered_resps") or []
    if resps and isinstance(resps[0], list | tuple):  # log-likelihoods: (logprob, greedy)
        row["logprobs"] = [float(r[0]) for r in resps]
        row["pred"] = max(range(len(resps)), key=lambda k: (resps[k][0], -k))
    elif resps:
        row["output"] = resps[0]
    return row
