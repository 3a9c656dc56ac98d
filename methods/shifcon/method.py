"""ShifCon on a Hugging Face decoder: hooks that shift, capture and truncate, and the method.

The math lives in `methods/shifcon/math.py`; this file only decides where it runs. Hooks sit on
decoder layers f..b and read two call keyword arguments that transformers forwards to every
decoder layer:

- ``shifcon_lang_ids`` [B]: shift this call (per sample, by language). Because it is an input of
  the call, activation-checkpoint recomputation sees the same value: the shift is a pure
  function of the layer's inputs, never of mutable global state.
- ``shifcon_capture`` {layer: None}: record the unshifted H_layer of these layers.
- ``shifcon_shift_mask`` [B, T] (optional): shift only these positions (`method.shift_positions:
  prompt` passes the prompt positions of a training batch).

Without ``shifcon_lang_ids`` a call is unshifted, unless `ShifConHooks.inference_languages`
sets the languages for a whole `generate` (transformers refuses unknown generate kwargs).
Under ``shift_positions: prompt`` a call that continues a KV cache (a generated token) is never
shifted: the prompt was shifted when it was prefilled, the answer is the dominant language's.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from config.errors import UserError
from data.batching import even_rounds
from data.formatting import IGNORE_INDEX, Batch, Example, chat_prompt_ids, collate, content_span
from data.pairs import Pair, load_pairs
from methods.base import Method, lm_loss
from methods.shifcon.detect import DETECTOR_FILE, LinearDetector
from methods.shifcon.math import (
    LanguageStats,
    all_reduce_,
    check_band,
    combine_losses,
    mcl_loss,
    pooled_mean,
    shift_backward,
    shift_toward,
)
from model.layers import decoder_layers, device_of, rank_world, truncated

LANG_KWARG = "shifcon_lang_ids"
CAPTURE_KWARG = "shifcon_capture"
SHIFT_MASK_KWARG = "shifcon_shift_mask"
SHIFT_POSITIONS = ("all", "prompt", "none")
VECTORS_FILE = "shifcon_vectors.safetensors"
META_FILE = "shifcon.json"


class ShifConHooks:
    """Shift-toward after layer f, shift-backward after layer b, capture on request."""

    def __init__(
        self, model: nn.Module, band: tuple[int, int], dominant: int, positions: str = "all"
    ) -> None:
        self.f, self.b = band
        check_band(self.f, self.b, model.config.num_hidden_layers)
        if positions not in SHIFT_POSITIONS:
            raise ValueError(f"shift positions must be one of {SHIFT_POSITIONS}, got {positions!r}")
        self.dominant = dominant
        self.positions = positions
        self.vectors: dict[int, torch.Tensor] = {}  # layer -> [K, D] language vectors
        self.languages: list[str] = []
        self.inference_lang_ids: torch.Tensor | None = None
        self.inference_mask: torch.Tensor | None = None
        layers = decoder_layers(model)
        self.handles = [
            layers[layer - 1].register_forward_hook(self._hook(layer), with_kwargs=True)
            for layer in range(self.f, self.b + 1)
        ]

    def set_vectors(self, stats: LanguageStats) -> None:
        """Take v_f and v_b as fresh float32 tensors (never mutated: autograd may hold them)."""
        self.languages = list(stats.languages)
        self.vectors = {layer: stats.layer_means(layer).float() for layer in (self.f, self.b)}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    @contextmanager
    def inference_languages(
        self, lang_ids: torch.Tensor | None, shift_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Shift every call inside by ``lang_ids``. ``shift_mask [B, T]``: the prompt positions
        of a teacher-forced call; only `shift_positions: prompt` hooks use it (the others shift
        every position), so callers may always pass it."""
        self.inference_lang_ids, self.inference_mask = lang_ids, shift_mask
        try:
            yield
        finally:
            self.inference_lang_ids, self.inference_mask = None, None

    def _continues_cache(self, layer: int, kwargs: dict, length: int) -> bool:
        """True when this call's tokens follow tokens already in the KV cache (decoding)."""
        cache = kwargs.get("cache", kwargs.get("past_key_values", kwargs.get("past_key_value")))
        if cache is None or not hasattr(cache, "get_seq_length"):
            return False
        return int(cache.get_seq_length(layer - 1)) > length

    def _hook(self, layer: int):
        def after_layer(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            capture = kwargs.get(CAPTURE_KWARG)
            if capture is not None and layer in capture:
                capture[layer] = hidden
            lang_ids = kwargs.get(LANG_KWARG)
            if lang_ids is None:
                lang_ids = self.inference_lang_ids
            if lang_ids is None or layer not in (self.f, self.b) or self.positions == "none":
                return None
            if lang_ids.dim() == 0:  # one language for the whole call (e.g. a benchmark split)
                lang_ids = lang_ids.expand(hidden.shape[0])
            if not self.vectors:
                raise RuntimeError("ShifCon: language vectors are not computed yet")
            mask = kwargs.get(SHIFT_MASK_KWARG)
            if self.positions == "prompt":
                if self._continues_cache(layer, kwargs, hidden.shape[1]):
                    return None  # a generated (dominant-language) token
                if mask is None and self.inference_mask is not None:
                    mask = self.inference_mask.to(hidden.device)
            shift = shift_toward if layer == self.f else shift_backward
            vectors = self.vectors[layer].to(hidden.device)
            shifted = shift(hidden, lang_ids, vectors, self.dominant, mask)
            return (shifted, *output[1:]) if isinstance(output, tuple) else shifted

        return after_layer


def capture_hidden(
    model: nn.Module, config_owner: nn.Module, batch: Batch, layers: Sequence[int]
) -> dict[int, torch.Tensor]:
    """Unshifted H_l of `layers`, running no decoder layer above max(layers)."""
    capture: dict[int, torch.Tensor | None] = dict.fromkeys(layers)
    with truncated(config_owner, max(layers)):
        model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            logits_to_keep=1,
            **{CAPTURE_KWARG: capture},
        )
    missing = [layer for layer, h in capture.items() if h is None]
    if missing:
        raise RuntimeError(f"ShifCon: layers {missing} produced no hidden states")
    return capture  # type: ignore[return-value]


def sentence_example(tokenizer, text: str, max_length: int) -> Example:
    """A parallel sentence as a user message in the chat template, as in training and inference
    (so the aligned states are the ones the shift acts on), pooled over the sentence's own
    tokens (`content_span`) like the vectors. Too long: the sentence is cut, the template kept."""
    ids = chat_prompt_ids(tokenizer, text)
    start, end = content_span(tokenizer, text)
    if len(ids) > max_length:
        keep_end = max(end - (len(ids) - max_length), start + 1)
        ids = (ids[:keep_end] + ids[end:])[:max_length]
        end = min(keep_end, len(ids))
    return Example(ids, ids, "", "", span=(start, end))


def pad_pairs(
    pairs: Sequence[Pair], tokenizer, max_length: int, lang_index: dict[str, int], dominant: int
) -> tuple[Batch, torch.Tensor]:
    """One batch: the dominant-language sentences (rows 0..B-1), then their targets."""
    texts = [p.en for p in pairs] + [p.target for p in pairs]
    examples = [sentence_example(tokenizer, text, max_length) for text in texts]
    batch = collate(examples, tokenizer.pad_token_id, [""])
    lang_ids = torch.tensor(
        [dominant] * len(pairs) + [lang_index[p.lang] for p in pairs], dtype=torch.long
    )
    return batch, lang_ids


class ShifCon(Method):
    name = "shifcon"

    def __init__(
        self,
        cfg,
        *,
        languages: Sequence[str],
        tokenizer,
        train_rows: Sequence[dict],
        seed: int,
        on_bad_row: str = "error",
    ) -> None:
        self.cfg = cfg
        self.languages = list(languages)
        self.lang_index = {lang: i for i, lang in enumerate(self.languages)}
        self.dominant = 0  # the run's language list puts the dominant language first
        self.tokenizer = tokenizer
        self.seed = seed
        self.pairs = load_pairs(
            cfg.pairs.path,
            train_rows=train_rows,
            dominant=self.languages[0],
            languages=self.languages,
            limit_per_language=cfg.pairs.limit_per_language,
            on_bad_row=on_bad_row,
        )
        # band: auto is chosen by the layer probe in `prepare` (or restored from a checkpoint).
        self.band: tuple[int, int] | None = None if cfg.band == "auto" else tuple(cfg.band)
        # Vectors of every layer the method touches: f..b (shift at f and b, MCL fallback
        # for [f, b)). A pipeline stage would keep only its own layers' rows.
        self.layers: list[int] = (
            [] if self.band is None else list(range(self.band[0], self.band[1] + 1))
        )
        self.probe_result = None  # ProbeResult when the band was chosen by the probe
        self.detector: LinearDetector | None = None  # fitted with the vectors (`prepare`)
        self.stats: LanguageStats | None = None
        self.calls = 0  # contrastive batches drawn so far (resumable pair order)
        self.hooks: ShifConHooks | None = None
        self.config_owner: nn.Module | None = None
        self.device = torch.device("cpu")

    # -- wiring ---------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        self.config_owner = model
        # Stats live where the collectives run (NCCL reduces CUDA tensors only).
        self.device = next(model.parameters()).device
        if self.band is not None:
            self._set_band(self.band)

    def _set_band(self, band: tuple[int, int]) -> None:
        """Fix the band and hook layers f..b (hooks may be added after the engine wraps)."""
        try:
            self.hooks = ShifConHooks(
                self.config_owner, tuple(band), self.dominant, self.cfg.shift_positions
            )
        except ValueError as exc:
            raise UserError(f"method.band: {exc}") from None
        self.band = (int(band[0]), int(band[1]))
        self.layers = list(range(self.band[0], self.band[1] + 1))

    def run_tags(self) -> dict[str, str]:
        """Tags and params the loop logs to MLflow once the method is prepared."""
        return {"shifcon.band": f"{self.band[0]},{self.band[1]}"} if self.band else {}

    def _probe(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> None:
        """band: auto: run the layer probe on the training samples and pairs through the
        engine's forward module (every rank the same number of forwards), then set the band."""
        from methods.shifcon.probe import run_probe

        inputs = self.probe_inputs(examples)
        result = run_probe(model, inputs, batch_size=batch_size, tolerance=self.cfg.probe_tolerance)
        self.probe_result = result
        self._set_band(result.band)
        if rank_world()[0] == 0:
            print(band_message(result))

    def probe_inputs(self, examples: Sequence[Example]):
        """band: auto: the probe's samples (the training samples) and pairs, every engine the
        same (`methods.shifcon.probe.ProbeInputs`)."""
        from methods.shifcon.probe import build_inputs

        n = self.cfg.probe_samples
        samples = [(ex.lang, ex.input_ids, self._span(ex)) for ex in examples]
        tok = self.tokenizer
        limit = self.cfg.pairs.max_length
        taken: dict[str, int] = {}
        pairs = []
        for p in self.pairs:  # tokenise only the pairs the probe uses
            if taken.get(p.lang, 0) < n:
                taken[p.lang] = taken.get(p.lang, 0) + 1
                en, x = (sentence_example(tok, t, limit) for t in (p.en, p.target))
                pairs.append((p.lang, en.input_ids, x.input_ids, self._span(en), self._span(x)))
        try:
            return build_inputs(self.languages, samples, pairs, n)
        except ValueError as exc:
            raise UserError(f"method.band: auto: {exc}") from None

    def capture_depth(self) -> int:
        """MCL needs H_f..H_{b-1}; running vectors also need H_b (one more layer)."""
        return self.band[1] if self.cfg.vector_mode == "running" else self.band[1] - 1

    # -- language vectors -----------------------------------------------------------------

    def prepare(self, model: nn.Module, examples: Sequence[Example], batch_size: int) -> None:
        """Precompute the vectors: N samples per language through the frozen model, each rank
        a share, one all-reduce. Every rank runs the same number of forwards (ZeRO-3 gathers
        are collectives); a rank short of work repeats a batch and discards it."""
        if self.band is None:
            self._probe(model, examples, batch_size)
        rank, world = rank_world()
        batches = self.vector_batches(examples, batch_size)
        hidden = self.config_owner.config.hidden_size
        stats = LanguageStats.zeros(self.languages, self.layers, hidden, device=self.device)
        # Detector features: pooled H_f of every vector sample, [rounds * batch, D + 1] (the
        # last column: language id, -1 for unused rows), gathered from all ranks at the end.
        rounds = -(-len(batches) // world)
        feats = torch.full((rounds * batch_size, hidden + 1), -1.0, device=self.device)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for r, (group, filler) in enumerate(even_rounds(batches, rank, world)):
                batch = collate(group, self.tokenizer.pad_token_id, self.languages)
                batch = batch.to(device_of(model))
                captured = capture_hidden(model, self.config_owner, batch, self.layers)
                if not filler:
                    mask = self.pool_mask(batch)
                    for layer, h in captured.items():
                        stats.update(layer, h, mask, batch.lang_ids)
                    rows = slice(r * batch_size, r * batch_size + len(group))
                    feats[rows, :hidden] = pooled_mean(captured[self.band[0]], mask).to(feats)
                    feats[rows, hidden] = batch.lang_ids.to(feats)
        model.train(was_training)
        self.stats = all_reduce_(stats)
        self.hooks.set_vectors(self.stats)
        self._fit_detector(feats, world)

    def _fit_detector(self, feats: torch.Tensor, world: int) -> None:
        """The `linear` language detector on the vector samples' pooled H_f (identical on
        every rank: the features of all ranks are gathered first)."""
        if world > 1:
            parts = [torch.empty_like(feats) for _ in range(world)]
            torch.distributed.all_gather(parts, feats)
            feats = torch.cat(parts)
        feats = feats[feats[:, -1] >= 0].cpu()
        self.detector = LinearDetector.fit(feats[:, :-1], feats[:, -1].long(), len(self.languages))

    def vector_batches(self, examples: Sequence[Example], batch_size: int) -> list[list[Example]]:
        """The first `vector_samples` training samples of every language, in batches: what the
        precomputed vectors average over (every engine, every rank, the same list)."""
        per_lang: dict[str, list[Example]] = {lang: [] for lang in self.languages}
        for ex in examples:
            if len(per_lang[ex.lang]) < self.cfg.vector_samples:
                per_lang[ex.lang].append(ex)
        empty = [lang for lang, exs in per_lang.items() if not exs]
        if empty:
            raise UserError(f"method.vector_samples: no training samples for {empty}")
        chosen = [ex for lang in self.languages for ex in per_lang[lang]]
        return [chosen[i : i + batch_size] for i in range(0, len(chosen), batch_size)]

    def _span(self, ex: Example) -> tuple[int, int]:
        if self.cfg.pooling == "all":
            return (0, len(ex))
        return ex.span or (1, len(ex))

    def pool_mask(self, batch: Batch) -> torch.Tensor:
        """The positions vectors and embeddings average over (`data.formatting.content_mask`);
        `method.pooling: all` is the original every-token mean, kept for ablation."""
        return batch.attention_mask if self.cfg.pooling == "all" else batch.pool_mask()

    def metrics(self) -> dict[str, float]:
        return self.shift_norms() if self.stats is not None else {}

    def shift_norms(self) -> dict[str, float]:
        """||v_en - v_X|| per language and boundary: how far the shift moves the stream."""
        out = {}
        for layer in self.band:
            v = self.stats.layer_means(layer)
            for i, lang in enumerate(self.languages[1:], start=1):
                out[f"shifcon/shift_norm/{lang}/L{layer}"] = float((v[0] - v[i]).norm())
        return out

    # -- training -------------------------------------------------------------------------

    def logits(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        extra = {LANG_KWARG: batch.lang_ids}
        if self.cfg.shift_positions == "prompt":
            extra[SHIFT_MASK_KWARG] = prompt_positions(batch)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **extra).logits

    def next_pairs(self, rank: int | None = None, world: int | None = None) -> list[Pair]:
        """The next contrastive pairs of this data-parallel rank (resumable: seeded by call)."""
        if rank is None or world is None:
            rank, world = rank_world()
        rng = random.Random(self.seed * 1_000_003 + self.calls * world + rank)
        self.calls += 1
        size = min(self.cfg.mcl_batch_size, len(self.pairs))
        return [self.pairs[i] for i in rng.sample(range(len(self.pairs)), size)]

    def contrastive(self, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """MCL over [f, b) on a fresh pair batch; updates running vectors when asked."""
        f, b = self.band
        pairs = self.next_pairs()
        batch, lang_ids = pad_pairs(
            pairs, self.tokenizer, self.cfg.pairs.max_length, self.lang_index, self.dominant
        )
        batch = batch.to(device_of(model))
        captured = capture_hidden(
            model, self.config_owner, batch, list(range(f, self.capture_depth() + 1))
        )
        n = len(pairs)
        mask = self.pool_mask(batch)
        means = self.stats.means()
        band_rows = [self.stats.layer_index(layer) for layer in range(f, b)]
        legacy = self.cfg.pooling == "all"
        loss, per_layer = mcl_loss(
            [captured[layer][:n] for layer in range(f, b)],
            [captured[layer][n:] for layer in range(f, b)],
            mask[:n],
            mask[n:],
            lang_ids[n:].to(mask.device),
            means[self.dominant, band_rows].float(),
            means[:, band_rows].float(),
            tau=self.cfg.tau,
            centres=None if legacy else means[:, band_rows].float(),
            dominant=self.dominant,
        )
        if self.cfg.vector_mode == "running":
            delta = self.stats.zeros_like()
            for layer in self.layers:
                delta.update(layer, captured[layer], mask, lang_ids)
            self.stats.add_(all_reduce_(delta))  # one fused all-reduce per update
            self.hooks.set_vectors(self.stats)
        return loss, per_layer

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        lm = lm_loss(self.logits(model, batch), batch)
        mcl, per_layer = self.contrastive(model)
        total = combine_losses(lm, mcl, self.cfg.alpha, self.cfg.beta)
        f = self.band[0]
        metrics = {"loss_lm": lm.item(), "loss_mcl": mcl.item()}
        metrics.update({f"loss_mcl/L{f + j}": v.item() for j, v in enumerate(per_layer)})
        return total, metrics

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "stats": self.stats.state_dict() if self.stats else None,
            "band": list(self.band) if self.band else None,
            "detector": self.detector.state_dict() if self.detector else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = state.get("calls", 0)
        if state.get("detector") is not None:
            self.detector = LinearDetector(**state["detector"])
        if self.band is None and state.get("band") is not None:
            self._set_band(tuple(state["band"]))
        if state.get("stats") is not None:
            self.stats = LanguageStats.from_state_dict(state["stats"], device=self.device)
            if self.hooks is not None:  # the megatron engine places its own shift layers
                self.hooks.set_vectors(self.stats)

    def export(self, directory: Path) -> None:
        save_shifcon(
            directory, self.stats, self.band, self.cfg.vector_mode, self.cfg.shift_positions
        )
        if self.detector is not None:
            self.detector.save(directory)
        if self.probe_result is not None:
            self.probe_result.save(directory)

    def artifacts(self, export_dir: Path) -> list[Path]:
        from methods.shifcon.probe import PLOT_FILE, PROBE_FILE

        files = [Path(export_dir) / VECTORS_FILE, Path(export_dir) / META_FILE]
        extra = [Path(export_dir) / name for name in (PROBE_FILE, PLOT_FILE, DETECTOR_FILE)]
        return files + [p for p in extra if p.is_file()]


def band_message(result) -> str:
    """What rank 0 prints once the probe has chosen the band (`ProbeResult`)."""
    curve = ", ".join(f"{d:.3f}" for d in result.mean_distance)
    return f"shifcon: band auto -> {list(result.band)} (mean distance per layer: {curve})"


def prompt_positions(batch: Batch) -> torch.Tensor:
    """[B, T] True where a position has no label: the prompt (and padding, never attended)."""
    return batch.labels == IGNORE_INDEX


def save_shifcon(
    directory: Path, stats: LanguageStats, band, vector_mode: str, shift_positions: str = "all"
) -> None:
    """The vectors that travel with a model: see docs/using_methods.md, "ShifCon export format"."""
    save_file(
        {
            "vectors": stats.means().float().cpu().contiguous(),
            "counts": stats.counts.cpu().contiguous(),
        },
        str(Path(directory) / VECTORS_FILE),
    )
    meta = {
        "format": 1,
        "languages": stats.languages,
        "dominant": stats.languages[0],
        "layers": stats.layers,
        "band": list(band),
        "vector_mode": vector_mode,
        "shift_positions": shift_positions,
    }
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2))


def load_shifcon(directory: Path) -> tuple[dict[str, Any], LanguageStats]:
    meta = json.loads((Path(directory) / META_FILE).read_text())
    tensors = load_file(str(Path(directory) / VECTORS_FILE))
    counts = tensors["counts"].double()
    stats = LanguageStats(
        languages=meta["languages"],
        layers=meta["layers"],
        sums=tensors["vectors"].double() * counts.unsqueeze(-1),
        counts=counts,
    )
    return meta, stats
