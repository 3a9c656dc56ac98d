"""ShifCon method math as plain tensor functions.

Written once and shared by every engine (DeepSpeed ZeRO-3, Megatron-core TP/PP): the engines
only decide where a layer lives and which process group reduces what. Nothing here touches a
module or a model; the only distributed call is the single fused all-reduce in `all_reduce_`.

Conventions (see docs/methods.md, "ShifCon specification"):
- layers are 1-based decoder layer indices; H_l is the output of layer l;
- ``mask`` is 1 for content (non-padding) tokens and 0 for padding;
- ``lang_ids`` holds one language index per sample, so a batch may mix languages;
- ``dominant`` is the index of the dominant language ("en").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LanguageStats",
    "all_reduce_",
    "check_band",
    "combine_losses",
    "language_stat_update",
    "mcl_loss",
    "pooled_mean",
    "sentence_embedding",
    "shift_backward",
    "shift_toward",
]

# Accumulator dtype of LanguageStats. float64 because running-mode sums grow over a whole
# training run (millions of tokens of residual values in the hundreds): float32 would silently
# drop late contributions, and counts above 2**24 would stop being exact. float64 keeps counts
# exact up to 2**53, lets sums and counts share one buffer (one all-reduce), and is supported by
# gloo and NCCL. The buffer is K * layers * D values: small next to the model.
STATS_DTYPE = torch.float64


def _check_batch(hidden: Tensor, mask: Tensor | None, lang_ids: Tensor) -> None:
    """Fail early with readable shapes instead of a broadcasting error deep in a kernel."""
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, D], got shape {tuple(hidden.shape)}")
    batch, seq = hidden.shape[:2]
    if mask is not None and tuple(mask.shape) != (batch, seq):
        raise ValueError(f"mask must be [B, T] = {(batch, seq)}, got {tuple(mask.shape)}")
    if lang_ids.dim() != 1 or lang_ids.shape[0] != batch:
        raise ValueError(f"lang_ids must be [B] = [{batch}], got {tuple(lang_ids.shape)}")
    if lang_ids.dtype.is_floating_point or lang_ids.dtype == torch.bool:
        raise ValueError(f"lang_ids must be an integer tensor, got {lang_ids.dtype}")


def language_stat_update(
    hidden: Tensor,
    mask: Tensor,
    lang_ids: Tensor,
    num_langs: int,
    acc_dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor]:
    """Per-language sums of raw hidden states over content tokens of one layer, and counts.

    Returns ``sums [K, D]`` and ``counts [K]`` (token counts) in ``acc_dtype``. Raw (not
    normalised) states, because the resulting means are added to the raw residual stream.
    Accumulates in float32 at least, so bf16 activations do not lose the sum's precision; the
    per-sample sums are scattered by language with ``index_add_`` (no Python loop over samples).
    """
    _check_batch(hidden, mask, lang_ids)
    weights = mask.to(acc_dtype)
    per_sample = torch.einsum("btd,bt->bd", hidden.detach().to(acc_dtype), weights)
    sums = hidden.new_zeros((num_langs, hidden.shape[-1]), dtype=acc_dtype)
    counts = hidden.new_zeros((num_langs,), dtype=acc_dtype)
    ids = lang_ids.to(device=hidden.device, dtype=torch.long)
    sums.index_add_(0, ids, per_sample)
    counts.index_add_(0, ids, weights.sum(dim=1))
    return sums, counts


@dataclass(eq=False)
class LanguageStats:
    """Per-(language, layer) sums and token counts of the residual stream.

    ``sums [K, Lyr, D]`` and ``counts [K, Lyr]`` are float64 (see ``STATS_DTYPE``). ``layers``
    are the 1-based decoder layers covered (a pipeline stage holds only its own). The language
    vectors are always ``means()`` = sum / count, never raw sums (a defect of the public code).

    Distributed use: sums add across ranks, so reduce only contributions that no rank has
    counted yet. In precompute mode, each rank updates on its own data shard and calls
    ``all_reduce_`` once at the end. In running mode, update a fresh ``zeros_like()`` delta per
    step, ``all_reduce_`` the delta, then ``add_`` it to the running totals.
    """

    languages: list[str]
    layers: list[int]
    sums: Tensor
    counts: Tensor
    _layer_pos: dict[int, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        k, n_layers = len(self.languages), len(self.layers)
        if len(set(self.languages)) != k or k == 0:
            raise ValueError(f"languages must be non-empty and unique, got {self.languages}")
        if len(set(self.layers)) != n_layers or any(layer < 1 for layer in self.layers):
            raise ValueError(f"layers must be unique 1-based indices, got {self.layers}")
        if self.sums.dim() != 3 or tuple(self.sums.shape[:2]) != (k, n_layers):
            raise ValueError(
                f"sums must be [K={k}, Lyr={n_layers}, D], got {tuple(self.sums.shape)}"
            )
        if tuple(self.counts.shape) != (k, n_layers):
            raise ValueError(f"counts must be [K={k}, Lyr={n_layers}], got {self.counts.shape}")
        self.sums = self.sums.to(STATS_DTYPE)
        self.counts = self.counts.to(device=self.sums.device, dtype=STATS_DTYPE)
        self._layer_pos = {layer: i for i, layer in enumerate(self.layers)}

    @classmethod
    def zeros(
        cls,
        languages: Sequence[str],
        layers: Sequence[int],
        hidden_size: int,
        device: torch.device | str | None = None,
    ) -> LanguageStats:
        """Empty statistics for the given languages and (1-based) layers."""
        k, n_layers = len(languages), len(layers)
        return cls(
            languages=list(languages),
            layers=list(layers),
            sums=torch.zeros(k, n_layers, hidden_size, dtype=STATS_DTYPE, device=device),
            counts=torch.zeros(k, n_layers, dtype=STATS_DTYPE, device=device),
        )

    def zeros_like(self) -> LanguageStats:
        """An empty container with the same languages/layers/device: a per-step delta."""
        return LanguageStats(
            list(self.languages),
            list(self.layers),
            torch.zeros_like(self.sums),
            torch.zeros_like(self.counts),
        )

    @property
    def hidden_size(self) -> int:
        return int(self.sums.shape[-1])

    def layer_index(self, layer: int) -> int:
        """Position of a 1-based decoder layer in this container."""
        try:
            return self._layer_pos[layer]
        except KeyError:
            raise KeyError(f"layer {layer} is not covered by these stats {self.layers}") from None

    def update(self, layer: int, hidden: Tensor, mask: Tensor, lang_ids: Tensor) -> None:
        """Add one batch of H_layer (unshifted) to the sums and counts."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden size {hidden.shape[-1]} != stats size {self.hidden_size}")
        pos = self.layer_index(layer)
        sums, counts = language_stat_update(hidden, mask, lang_ids, len(self.languages))
        self.sums[:, pos].add_(sums.to(self.sums.device, STATS_DTYPE))
        self.counts[:, pos].add_(counts.to(self.counts.device, STATS_DTYPE))

    def add_(self, other: LanguageStats) -> LanguageStats:
        """Add another container's sums and counts (e.g. a reduced per-step delta)."""
        if other.languages != self.languages or other.layers != self.layers:
            raise ValueError("cannot add LanguageStats with different languages or layers")
        self.sums.add_(other.sums.to(self.sums.device))
        self.counts.add_(other.counts.to(self.counts.device))
        return self

    def means(self) -> Tensor:
        """Language vectors v^X_l = sum / count, ``[K, Lyr, D]`` float64.

        Raises ValueError naming the first (language, layer) that has no tokens, because a zero
        vector would silently become a wrong shift.
        """
        empty = (self.counts <= 0).nonzero()
        if empty.numel():
            k, pos = (int(i) for i in empty[0])
            raise ValueError(
                f"no tokens seen for language '{self.languages[k]}' at layer "
                f"{self.layers[pos]}: cannot form its language vector (count is 0)"
            )
        return self.sums / self.counts.unsqueeze(-1)

    def layer_means(self, layer: int) -> Tensor:
        """Language vectors ``[K, D]`` of one 1-based layer (what the shift functions take)."""
        return self.means()[:, self.layer_index(layer)]

    def flat(self) -> Tensor:
        """Sums and counts packed into one contiguous 1-D buffer, for one fused all-reduce."""
        return torch.cat([self.sums.reshape(-1), self.counts.reshape(-1)])

    def load_flat(self, buffer: Tensor) -> None:
        """Unpack a buffer produced by ``flat()`` (possibly reduced) into sums and counts."""
        n_sums, n_counts = self.sums.numel(), self.counts.numel()
        if buffer.dim() != 1 or buffer.numel() != n_sums + n_counts:
            raise ValueError(
                f"flat buffer must be 1-D with {n_sums + n_counts} values, "
                f"got shape {tuple(buffer.shape)}"
            )
        buffer = buffer.to(device=self.sums.device, dtype=STATS_DTYPE)
        self.sums.copy_(buffer[:n_sums].view_as(self.sums))
        self.counts.copy_(buffer[n_sums:].view_as(self.counts))

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint/export form: plain tensors and lists (vectors ship with every model)."""
        return {
            "languages": list(self.languages),
            "layers": list(self.layers),
            "sums": self.sums.detach().cpu().clone(),
            "counts": self.counts.detach().cpu().clone(),
        }

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], device: torch.device | str | None = None
    ) -> LanguageStats:
        """Rebuild from ``state_dict()`` output, on ``device`` if given."""
        return cls(
            languages=list(state["languages"]),
            layers=[int(layer) for layer in state["layers"]],
            sums=torch.as_tensor(state["sums"]).to(device=device).clone(),
            counts=torch.as_tensor(state["counts"]).to(device=device).clone(),
        )


def all_reduce_(stats: LanguageStats, group: Any = None) -> LanguageStats:
    """Sum ``stats`` over ``group`` in place with exactly one all-reduce; no-op when not distributed.

    One fused collective per update (sums and counts packed together) so every rank ends up
    with identical vectors. The buffer lives on the stats' device: with NCCL keep the stats on
    the current CUDA device. Which group (data-parallel, plus tensor-parallel under sequence
    parallelism) is the engine's decision.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats
    buffer = stats.flat()
    dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
    stats.load_flat(buffer)
    return stats


def _shift(
    h: Tensor, lang_ids: Tensor, delta_per_lang: Tensor, dominant: int, mask: Tensor | None
) -> Tensor:
    """Add ``delta_per_lang[lang]`` to every position of each non-dominant sample."""
    _check_batch(h, mask, lang_ids)
    if delta_per_lang.dim() != 2 or delta_per_lang.shape[-1] != h.shape[-1]:
        raise ValueError(f"vectors must be [K, D={h.shape[-1]}], got {tuple(delta_per_lang.shape)}")
    if not 0 <= dominant < delta_per_lang.shape[0]:
        raise ValueError(f"dominant index {dominant} out of range for {delta_per_lang.shape[0]}")
    ids = lang_ids.to(device=h.device, dtype=torch.long)
    # Delta in the vectors' precision, then cast once to the stream dtype.
    delta = delta_per_lang.to(h.device)[ids].to(h.dtype).unsqueeze(1)  # [B, 1, D]
    keep = (ids == dominant).view(-1, 1, 1)
    if mask is not None:
        keep = keep | ~mask.to(device=h.device, dtype=torch.bool).unsqueeze(-1)
    # torch.where (not "+ 0") keeps dominant rows bitwise identical, -0.0 and NaN included.
    return torch.where(keep, h, h + delta)


def shift_toward(
    h: Tensor, lang_ids: Tensor, vectors: Tensor, dominant: int, mask: Tensor | None = None
) -> Tensor:
    """Shift-toward after layer f: H_f <- H_f - v^X_f + v^en_f for every non-dominant sample.

    ``vectors [K, D]`` are the language vectors of layer f (buffers: no gradient flows to
    them). Dominant-language samples are returned bitwise unchanged. The shift applies at every
    position: at inference that covers prompt and generated tokens alike, and shifting padding
    is harmless because padded positions are masked out of attention and loss. Pass ``mask`` only
    to leave padded positions untouched as well. Differentiable in ``h``; keeps ``h.dtype``.
    """
    v = vectors.detach()
    return _shift(h, lang_ids, v[dominant].unsqueeze(0) - v, dominant, mask)


def shift_backward(
    h: Tensor, lang_ids: Tensor, vectors: Tensor, dominant: int, mask: Tensor | None = None
) -> Tensor:
    """Shift-backward after layer b: H_b <- H_b - v^en_b + v^X_b, the inverse of shift_toward.

    ``vectors [K, D]`` are the language vectors of layer b. Same conventions as shift_toward.
    """
    v = vectors.detach()
    return _shift(h, lang_ids, v - v[dominant].unsqueeze(0), dominant, mask)


def pooled_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Raw mean of ``h [B, T, D]`` over the positions of ``mask`` (`data.formatting.content_mask`:
    the pooling definition shared by vectors, MCL, probe and detection), ``[B, D]`` float32.

    Float32 so bf16 streams do not lose the mean's precision. A sample with no pooled position
    yields a zero vector rather than NaN.
    """
    if h.dim() != 3 or tuple(mask.shape) != tuple(h.shape[:2]):
        raise ValueError(f"need h [B,T,D] and mask [B,T], got {tuple(h.shape)}, {mask.shape}")
    weights = mask.to(device=h.device, dtype=torch.float32)
    summed = torch.einsum("btd,bt->bd", h.float(), weights)
    return summed / weights.sum(dim=1, keepdim=True).clamp(min=1.0)


def sentence_embedding(h: Tensor, mask: Tensor, centre: Tensor | None = None) -> Tensor:
    """s(.) = L2-normalised ``pooled_mean`` of ``h [B, T, D]``, ``[B, D]`` float32.

    ``centre [B, D]`` or ``[D]`` (optional) is subtracted before normalising: the language
    vector of each sample's language, so that what is compared is where a sentence sits
    relative to its language, not the direction shared by all sentences (docs/shifcon.md).
    """
    mean = pooled_mean(h, mask)
    if centre is not None:
        mean = mean - centre.detach().to(device=mean.device, dtype=mean.dtype)
    return F.normalize(mean, dim=-1)


def _language_means(
    emb: Tensor, lang_ids: Tensor, num_langs: int, fallback: Tensor | None, what: str
) -> Tensor:
    """Per-language means of ``emb [B, D]`` in the batch, ``[K, D]``.

    Languages with fewer than 2 samples in the batch take the L2-normalised row of
    ``fallback [K, D]`` (the stored vector), because a mean over one sample would cancel that
    sample's own content.
    """
    onehot = F.one_hot(lang_ids.to(device=emb.device, dtype=torch.long), num_langs)
    onehot = onehot.to(emb.dtype)  # [B, K]
    counts = onehot.sum(dim=0)  # [K]
    batch_means = (onehot.t() @ emb) / counts.clamp(min=1.0).unsqueeze(-1)
    use_batch = (counts >= 2).unsqueeze(-1)
    if fallback is None:
        if bool(((counts > 0) & (counts < 2)).any()):
            raise ValueError(
                f"a {what} language has fewer than 2 samples in the batch and no stored "
                "fallback vector was given"
            )
        return batch_means
    fb = F.normalize(fallback.detach().to(device=emb.device, dtype=emb.dtype), dim=-1)
    return torch.where(use_batch, batch_means, fb)


def mcl_loss(
    anchor_hidden: Sequence[Tensor],
    target_hidden: Sequence[Tensor],
    anchor_mask: Tensor,
    target_mask: Tensor,
    target_lang_ids: Tensor,
    dominant_mean_fallback: Tensor | None,
    lang_mean_fallback: Tensor | None,
    tau: float = 1.0,
    centres: Tensor | None = None,
    dominant: int = 0,
) -> tuple[Tensor, Tensor]:
    """Multilingual contrastive loss over the band layers [f, b); returns (mean, per-layer).

    With ``centres [K, Lyr, D]`` (the raw language vectors v^X_l of the band layers; the
    default of the method): a_i = normalise(mean H_l(e_i) - v^en_l) and
    p_i = normalise(mean H_l(x_i) - v^X_l). Since the shift adds v^en - v^X at every position,
    p_i is the shifted target centred on the English mean, the same centre as the anchor: the
    two are compared where sentences differ, not along the direction every sentence shares.
    No batch statistics, so any mix of languages in a batch works. The fallbacks are unused.

    Without ``centres`` (the original formulation, kept for ablation):

    ``anchor_hidden[j]`` / ``target_hidden[j]`` are the unshifted H_l ``[B, T, D]`` of band
    layer l = f + j for the English sentences e_i and their parallel targets x_i (pair i is row
    i of both). Per layer: a_i = s_l(e_i); p_i = normalise(s_l(x_i) - m^{X_i}_l + m^en_l) moves
    each target into the English subspace, with m the batch means of s_l per language (mixed
    target languages allowed). A language with fewer than 2 samples in the batch uses its
    normalised stored vector instead: ``dominant_mean_fallback [Lyr, D]`` for the anchors and
    ``lang_mean_fallback [K, Lyr, D]`` for the targets, indexed by band position j (slice the
    stored vectors to the band). Loss = symmetric InfoNCE with in-batch negatives at
    temperature ``tau``: mean of CE(a->p) and CE(p->a); averaged over layers.
    """
    if len(anchor_hidden) != len(target_hidden) or not anchor_hidden:
        raise ValueError("anchor_hidden and target_hidden must be equal-length, non-empty lists")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    batch = anchor_hidden[0].shape[0]
    if target_hidden[0].shape[0] != batch or tuple(target_lang_ids.shape) != (batch,):
        raise ValueError("anchor, target and target_lang_ids must share the batch size")
    if lang_mean_fallback is not None:
        n_langs = int(lang_mean_fallback.shape[0])
    else:
        n_langs = int(target_lang_ids.max()) + 1 if batch else 1
    labels = torch.arange(batch, device=anchor_hidden[0].device)
    all_en = torch.zeros(batch, dtype=torch.long, device=anchor_hidden[0].device)
    losses = []
    for j, (h_en, h_x) in enumerate(zip(anchor_hidden, target_hidden, strict=True)):
        if centres is not None:
            c = centres[:, j].detach().to(device=h_en.device, dtype=torch.float32)
            ids = target_lang_ids.to(device=h_en.device, dtype=torch.long)
            a = sentence_embedding(h_en, anchor_mask, c[dominant])
            p = sentence_embedding(h_x, target_mask, c[ids]).to(a.device)
            logits = a @ p.t() / tau
            losses.append(
                0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
            )
            continue
        a = sentence_embedding(h_en, anchor_mask)
        s_x = sentence_embedding(h_x, target_mask).to(a.device)
        en_fb = None if dominant_mean_fallback is None else dominant_mean_fallback[j : j + 1]
        m_en = _language_means(a, all_en, 1, en_fb, "dominant")[0]
        x_fb = None if lang_mean_fallback is None else lang_mean_fallback[:, j]
        m_x = _language_means(s_x, target_lang_ids, n_langs, x_fb, "target")
        ids = target_lang_ids.to(device=a.device, dtype=torch.long)
        p = F.normalize(s_x - m_x[ids] + m_en, dim=-1)
        logits = a @ p.t() / tau
        losses.append(0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)))
    per_layer = torch.stack(losses)
    return per_layer.mean(), per_layer


def combine_losses(lm: Tensor, mcl: Tensor | None, alpha: float = 0.5, beta: float = 2.0) -> Tensor:
    """Total loss = alpha * LM + beta * MCL (public-code defaults); MCL may be absent."""
    return alpha * lm if mcl is None else alpha * lm + beta * mcl


def check_band(f: int, b: int, num_layers: int) -> None:
    """Raise ValueError unless 1 <= f < b <= L-1 (both shifts must sit between decoder layers)."""
    ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (f, b, num_layers))
    if not ints or not 1 <= f < b <= num_layers - 1:
        raise ValueError(
            f"ShifCon band (f={f!r}, b={b!r}) is invalid for a {num_layers!r}-layer decoder: "
            f"need integers with 1 <= f < b <= L-1 = {num_layers - 1 if ints else 'L-1'}"
        )
