"""The :class:`eval.scorer.Scorer` protocol on a training engine, and the post-training run.

``EngineScorer`` scores through ``Engine.forward_logits`` (and the method's own forward), so
the benchmarks run on the partitioned model that was just trained, with the method's
per-language behaviour (ShifCon's shift) exactly as in training, and no reload of the export.
It relies only on the engine interface (``parallel/engine.py``): ``forward_logits``,
``prefill``/``decode``/``end_decode`` (cached generation), ``forward_module``, ``method``,
``ctx`` and ``dp_rank``/``dp_size``; nothing DeepSpeed-specific, so a Megatron engine behind
the same interface works unchanged.

Collectives: on a partitioned model a forward is a collective (ZeRO-3 gathers parameters,
tensor/pipeline parallelism exchange activations), so every rank must call
``forward_logits`` (and ``prefill``/``decode``) equally often. Each scorer call first agrees
on the number of batches (one all-reduce MAX); a rank short of work runs a one-token filler
batch and discards it.
Generation agrees after every step whether any rank still has a running row; a rank with no
prompts decodes a one-token filler row alongside.

Rows are split over data-parallel shards (``data_shard`` = (dp_rank, dp_size)), which
``eval.tasks`` reads: ranks of one model-parallel group score the same rows together.

Supported formats: all four. Log-likelihood (XCOPA, perplexity) uses ``forward_logits``,
generation (MGSM) the engine's KV cache (``prefill`` then ``decode``). Hidden states
(bitext) call ``engine.forward_module`` through the method's forward with
``output_hidden_states=True``; an engine whose forward does not return
hidden states (e.g. a pipeline stage that only holds some layers) raises
:class:`EngineUnsupported`, and ``run_benchmarks`` then skips bitext with a note pointing at
``python -m launcher.evaluate`` on the export.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
import torch.distributed as dist

from data.formatting import IGNORE_INDEX, Batch, left_pad, right_pad
from eval.scorer import BatchedScorer, mean_pool_layers


class EngineUnsupported(RuntimeError):
    """The engine cannot provide what a format needs (raised on every rank alike)."""


def _max_over_ranks(value: int) -> int:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


class EngineScorer(BatchedScorer):
    """:class:`Scorer` over a training engine (every rank constructs one and calls it alike).

    ``languages``: the run's language list (``Batch.lang_ids`` index it, dominant first).
    Inside ``language(lang)`` every request carries ``lang``'s id, so a method whose forward
    depends on the language (ShifCon) shifts it as in training; a language the run does not
    have gets the dominant language's id, which every method leaves unshifted (as an export is
    scored for a language without vectors). ``shift=False`` scores every language unshifted.

    Generation is greedy decoding with the engine's KV cache (``Engine.prefill`` once, then
    ``Engine.decode`` one token per row per step; the method's shift on at every step, on
    every pipeline stage). ``kv_cache=False`` instead repeats ``forward_logits`` over the
    whole right-padded sequence per step (quadratic; kept as the reference). Both give the
    answers of ``HFScorer`` on the export: every row sees positions 0..n-1 either way.
    """

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        languages: Sequence[str],
        *,
        batch_size: int = 8,
        chat: bool = True,
        system_prompt: str | None = None,
        max_length: int = 2048,
        stop_ids: set[int] | None = None,
        shift: bool = True,
        kv_cache: bool = True,
    ) -> None:
        super().__init__(
            tokenizer,
            batch_size=batch_size,
            chat=chat,
            system_prompt=system_prompt,
            max_length=max_length,
            stop_ids=stop_ids,
        )
        self.engine = engine
        self.languages = list(languages)
        self.shift = shift
        self.kv_cache = kv_cache
        self._lang_id = 0
        self.forwards = 0  # forward passes this rank ran (equal on every rank)

    @property
    def data_shard(self) -> tuple[int, int]:
        return int(self.engine.dp_rank), int(self.engine.dp_size)

    @contextmanager
    def language(self, lang: str) -> Iterator[None]:
        before = self._lang_id
        known = self.shift and lang in self.languages
        self._lang_id = self.languages.index(lang) if known else 0
        try:
            yield
        finally:
            self._lang_id = before

    # -- batches -------------------------------------------------------------------------------

    def _batch(self, seqs: Sequence[Sequence[int]]) -> tuple[Batch, torch.Tensor]:
        ids, mask = right_pad(seqs, self.pad_id)
        labels = torch.full_like(ids, IGNORE_INDEX)
        langs = torch.full((len(seqs),), self._lang_id, dtype=torch.long)
        return Batch(ids, mask, labels, langs), mask

    def _filler(self) -> Batch:
        return self._batch([[self.pad_id]])[0]

    def _logits(self, batch: Batch) -> torch.Tensor:
        self.forwards += 1
        return self.engine.forward_logits(batch)

    # -- Scorer --------------------------------------------------------------------------------

    def grad_mode(self) -> AbstractContextManager[Any]:
        return torch.no_grad()

    def batch_rounds(self, order: Sequence[int]) -> list[list[int]]:
        """This rank's batches, then empty (filler) rounds up to the most any rank has: the
        count is agreed before the first forward, as forwards are collectives."""
        chunks = super().batch_rounds(order)
        return chunks + [[] for _ in range(_max_over_ranks(len(chunks)) - len(chunks))]

    def row_logits(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        return self._logits(self._batch(seqs)[0] if seqs else self._filler())

    def generate_rows(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        return self.generate_ids(prompts, max_new_tokens)

    def generate_ids(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        """Greedy new ids per prompt (each ends at its first stop id, or max_new_tokens).

        With ``kv_cache`` (the default): one prefill of the left-padded prompts, then one
        token per row per step through the engine's cache (``Engine.prefill``/``decode``).
        Without: a full forward over the right-padded sequences per step. Either way the loop
        ends when no rank has a running row, so every rank runs the same number of forwards
        (an idle rank decodes a one-token filler row).
        """
        if self.kv_cache:
            return self._generate_cached(prompts, max_new_tokens)
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in seqs]
        running = list(range(len(seqs)))
        for _ in range(max_new_tokens):
            if not _max_over_ranks(len(running)):
                break
            if not running:
                self._logits(self._filler())
                continue
            batch, mask = self._batch([seqs[i] for i in running])
            logits = self._logits(batch)
            last = mask.sum(dim=1) - 1  # each row's own last position (right padding)
            picks = logits[torch.arange(len(running)), last.to(logits.device)].argmax(dim=-1)
            running = self._append(running, picks.tolist(), seqs, new)
        return new

    def _append(
        self, running: list[int], picks: Sequence[int], seqs: list[list[int]], new: list[list[int]]
    ) -> list[int]:
        """Add each running row's pick; the rows that go on (no stop id, room left)."""
        still = []
        for i, token in zip(running, picks, strict=True):
            seqs[i].append(token)
            new[i].append(token)
            if token not in self.stop_ids and len(seqs[i]) < self.max_length:
                still.append(i)
        return still

    def _generate_cached(
        self, prompts: Sequence[Sequence[int]], max_new_tokens: int
    ) -> list[list[int]]:
        seqs = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in seqs]
        if max_new_tokens <= 0 or not _max_over_ranks(len(seqs)):
            return new
        rows = seqs or [[self.pad_id]]  # an idle rank decodes a filler row
        ids, mask = left_pad(rows, self.pad_id)
        langs = torch.full((len(rows),), self._lang_id, dtype=torch.long)
        batch = Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX), langs)
        self.forwards += 1
        logits, state = self.engine.prefill(batch, max_new_tokens)
        try:
            running = list(range(len(seqs)))
            for step in range(max_new_tokens):
                picks = logits.argmax(dim=-1)
                pick_list = picks.tolist()
                running = self._append(running, [pick_list[i] for i in running], seqs, new)
                if step + 1 == max_new_tokens or not _max_over_ranks(len(running)):
                    break
                self.forwards += 1
                logits = self.engine.decode(state, picks)  # finished rows ride along, ignored
        finally:
            self.engine.end_decode(state)
        return new

    @torch.no_grad()
    def hidden_states(self, texts: Sequence[str]) -> torch.Tensor:
        encoded = self.hidden_inputs(texts)
        pooled: list[torch.Tensor | None] = [None] * len(encoded)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        shape: tuple[int, int] | None = None
        for chunk in self.batch_rounds(order):
            if not chunk:
                states = self._forward_hidden(self._filler())
                shape = (len(states), states[0].shape[-1])
                continue
            batch, mask = self._batch([encoded[i] for i in chunk])
            states = self._forward_hidden(batch)
            shape = (len(states), states[0].shape[-1])
            means = mean_pool_layers(states, mask)
            for row, i in enumerate(chunk):
                pooled[i] = means[row]
        if not encoded:
            if shape is None:  # nobody had texts: no forward ran, nothing to size from
                return torch.zeros(0, 0, 0)
            return torch.zeros(0, *shape)
        return torch.stack([p for p in pooled if p is not None])

    def _forward_hidden(self, batch: Batch) -> Sequence[torch.Tensor]:
        """Every layer's output, from the engine (through the method's forward)."""
        self.forwards += 1
        try:
            states = self.engine.hidden_states(batch)
        except TypeError as exc:  # a forward without an output_hidden_states argument
            raise EngineUnsupported(
                f"{type(self.engine).__name__}: hidden states unavailable ({exc}); evaluate "
                "bitext on the export (python -m launcher.evaluate --model RUN/export)"
            ) from None
        if not states:
            raise EngineUnsupported(
                f"{type(self.engine).__name__}: its forward module returns no hidden states; "
                "evaluate bitext on the export (python -m launcher.evaluate --model RUN/export)"
            )
        return states


# --------------------------------------------------------------------------------------------
# After training
# --------------------------------------------------------------------------------------------


def backbone_limits(recipe: Any) -> tuple[set[int], int]:
    """(EOS ids of the backbone's generation config, its longest position): what ``generate``
    and ``HFScorer`` on the export use, read from the backbone's files (not the engine)."""
    from transformers import AutoConfig, GenerationConfig

    from model.backbone import resolve_backbone

    path = resolve_backbone(recipe.model).path
    config = AutoConfig.from_pretrained(path)
    max_positions = int(getattr(config, "max_position_embeddings", None) or 2048)
    try:
        eos = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json: the model config's
        eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return set(), max_positions
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}, max_positions


def check_benchmarks(session: Any) -> None:
    """Read every benchmark file of the ``eval:`` section before training starts, so a missing
    folder or a malformed row (``file:line``) stops the run now, not after training."""
    from config.errors import UserError
    from eval.benchmarks import BenchmarkError
    from eval.suite import check_data, load_task_data, with_languages

    section = session.recipe.eval
    if not section.enabled:
        return
    options = with_languages(section, session.data.languages)
    try:
        check_data(options)
        found = {task: load_task_data(task, options)[0] for task in options.tasks}
    except BenchmarkError as exc:
        raise UserError(f"eval: {exc}") from None
    if not any(found.values()):
        raise UserError(
            f"eval: no benchmark data for languages {options.languages} in any of "
            f"{options.tasks} (eval.data_dir / eval.files)"
        )


def run_benchmarks(session: Any, tracker: Any, step: int) -> dict[str, float] | None:
    """The recipe's ``eval:`` benchmarks on the session's engine, after training (all ranks).

    Rank 0 prints the per-language table, writes ``<run_dir>/eval/results.json`` and the bar
    charts, and logs metrics (``eval/<task>/<metric>/<lang>``) and artifacts through the
    run's tracker. Returns the flat metrics (on every rank), or None when no task is set.
    """
    from eval.report import flat_metrics
    from eval.suite import evaluate, publish, with_languages

    recipe, ctx = session.recipe, session.ctx
    section = recipe.eval
    if not section.enabled:
        return None
    options = with_languages(section, session.data.languages)
    if options.system_prompt is None and recipe.data.system_prompt:
        options = options.model_copy(update={"system_prompt": recipe.data.system_prompt})
    stop_ids, max_positions = backbone_limits(recipe)
    scorer = EngineScorer(
        session.engine,
        session.tokenizer,
        session.data.languages,
        batch_size=options.batch_size,
        chat=options.chat,
        system_prompt=options.system_prompt,
        max_length=options.max_length or max_positions,
        stop_ids=stop_ids,
        shift=options.shift,
    )
    results, skipped = {}, {}
    for task in options.tasks:  # one at a time: an unsupported format skips, the rest run
        try:
            more, more_skipped = evaluate(scorer, options.model_copy(update={"tasks": [task]}))
        except EngineUnsupported as exc:  # raised on every rank alike, after the same forwards
            skipped[task] = {"*": str(exc)}
            continue
        results.update(more)
        skipped.update(more_skipped)
    ordered = {t: results[t] for t in options.tasks if t in results}
    if ctx.is_rank0:
        meta = {"model": f"engine:{recipe.name}@step{step}", "languages": options.languages,
                "limit": options.limit, "world_size": ctx.world_size, "skipped": skipped,
                "forwards_per_rank": scorer.forwards}  # fmt: skip
        print("benchmarks on the training engine:", flush=True)
        publish(ordered, skipped, meta, tracker, session.run_dir / "eval" / "results.json",
                step=step)  # fmt: skip
        tracker.log_text(json.dumps(skipped, indent=2), "eval/skipped.json")
    return flat_metrics(ordered)
