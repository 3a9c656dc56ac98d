"""Language-agnostic / language-specific decomposition, subspace distance and band selection.

Used by ShifCon (choose the layer band [f, b]) and Lens (agnostic direction and specific
subspace of the top layer). Plain tensor functions, shared by every engine.

The subspace distance below is this project's own definition (docs/methods.md, "Subspace distance
metric and layer-band selection"): the ShifCon paper's exact formula was not available to us.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from methods.shifcon.math import check_band

__all__ = [
    "Decomposition",
    "agnostic_direction",
    "bitext_retrieval_accuracy",
    "decompose",
    "language_id_accuracy",
    "mean_distance_per_layer",
    "per_layer_distances",
    "project",
    "project_direction",
    "select_band",
    "subspace_distance",
]


@dataclass(frozen=True)
class Decomposition:
    """Split of K language means at one layer.

    ``agnostic [D]``: mean of the language means, the component shared by all languages.
    ``specific_basis [D, r]``: orthonormal columns spanning the language-specific subspace.
    ``singular_values [r]``: how much spread between languages each direction carries.
    """

    agnostic: Tensor
    specific_basis: Tensor
    singular_values: Tensor


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Results at least float32 (SVD has no bf16/fp16 kernels), else the input precision."""
    return torch.promote_types(dtype, torch.float32)


def decompose(means: Tensor, rank: int | None = None) -> Decomposition:
    """Decompose language means ``[K, D]`` via SVD of the centred matrix (r = K-1 by default).

    Computed in float64 because the matrix is tiny and near-equal singular values would
    otherwise make the basis unstable. Column signs are fixed (largest-magnitude entry
    positive) so repeated runs give identical bases; only the span U U^T is meaningful.
    """
    if means.dim() != 2:
        raise ValueError(f"means must be [K, D], got shape {tuple(means.shape)}")
    k, d = means.shape
    if k < 2:
        raise ValueError(f"need at least 2 languages to decompose, got {k}")
    max_rank = min(k - 1, d)
    r = max_rank if rank is None else rank
    if not 1 <= r <= max_rank:
        raise ValueError(f"rank must be in [1, {max_rank}] for {k} languages of size {d}, got {r}")
    w = means.detach().to(torch.float64)
    agnostic = w.mean(dim=0)
    _, s, vh = torch.linalg.svd(w - agnostic, full_matrices=False)
    basis = vh[:r].t()  # [D, r]
    pivot = basis.abs().argmax(dim=0)
    signs = torch.sign(basis.gather(0, pivot.unsqueeze(0))).squeeze(0)
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)
    out = _out_dtype(means.dtype)
    return Decomposition(agnostic.to(out), basis.to(out), s[:r].to(out))


def agnostic_direction(dec: Decomposition) -> Tensor:
    """Unit vector of the language-agnostic component (Lens' direction a)."""
    norm = dec.agnostic.norm()
    if norm == 0:
        raise ValueError("the agnostic component is zero: it has no direction")
    return dec.agnostic / norm


def project(x: Tensor, basis: Tensor) -> Tensor:
    """P_M x = U U^T x for ``x [..., D]`` and orthonormal ``basis [D, r]``."""
    u = basis.to(device=x.device, dtype=x.dtype)
    return (x @ u) @ u.t()


def project_direction(x: Tensor, a: Tensor) -> Tensor:
    """Component of ``x [..., D]`` along direction ``a [D]`` (normalised here)."""
    unit = F.normalize(a.to(device=x.device, dtype=x.dtype), dim=0)
    return (x @ unit).unsqueeze(-1) * unit


def subspace_distance(means: Tensor, dominant_idx: int, rank: int | None = None) -> Tensor:
    """d(X) = ||U^T (v^X - v^en)|| / ||v^en|| for every language, ``[K]`` (0 for en).

    How far language X sits from the dominant language inside the language-specific subspace,
    relative to the size of the dominant vector so that layers with different stream norms
    compare. Our own definition (the paper's exact formula was not available).
    """
    k = means.shape[0]
    if not 0 <= dominant_idx < k:
        raise ValueError(f"dominant_idx {dominant_idx} out of range for {k} languages")
    dec = decompose(means, rank)
    w = means.detach().to(dec.specific_basis.dtype)
    en_norm = w[dominant_idx].norm()
    if en_norm == 0:
        raise ValueError("the dominant language vector is zero: distance is undefined")
    coords = (w - w[dominant_idx]) @ dec.specific_basis  # [K, r]
    return coords.norm(dim=-1) / en_norm


def per_layer_distances(
    means_per_layer: Tensor, dominant_idx: int, rank: int | None = None
) -> Tensor:
    """Subspace distances for every layer: ``[Lyr, K, D]`` means -> ``[Lyr, K]``."""
    if means_per_layer.dim() != 3:
        raise ValueError(f"means must be [Lyr, K, D], got {tuple(means_per_layer.shape)}")
    return torch.stack([subspace_distance(m, dominant_idx, rank) for m in means_per_layer])


def mean_distance_per_layer(distances: Tensor, dominant_idx: int) -> list[float]:
    """Mean distance over the non-dominant languages per layer: the curve ``select_band`` takes.

    The dominant language is left out because its distance is 0 by construction.
    """
    keep = [k for k in range(distances.shape[1]) if k != dominant_idx]
    if not keep:
        raise ValueError("need at least one non-dominant language")
    return distances[:, keep].mean(dim=1).tolist()


def select_band(
    mean_distance_per_layer: Sequence[float],
    tolerance: float = 0.1,
    exclude_first: int = 1,
    exclude_last: int = 1,
) -> tuple[int, int]:
    """Pick the ShifCon band (f, b) from a mean-distance curve (index 0 = layer 1).

    Our own rule (the paper's exact formula was not available): the band is the longest
    contiguous run of allowed layers whose distance is at most ``min * (1 + tolerance)``, the
    tolerance being relative to the minimum over the allowed layers (0.1 = within 10 % of it).
    Allowed layers skip the first ``exclude_first`` and last ``exclude_last`` layers, and always
    layer L, so the result satisfies 1 <= f < b <= L-1 (checked with ``check_band``).

    - Ties between equally long runs: the run holding the lower minimum (so the run containing
      the overall minimum wins), then the earliest run.
    - A flat curve is one run: the whole allowed range.
    - A one-layer best run is extended to its lower-distance neighbour (the earlier one on a
      tie), because the band needs f < b.
    Returns 1-based (f, b) = (first, last layer of the run).
    """
    d = [float(x) for x in mean_distance_per_layer]
    n_layers = len(d)
    if any(not math.isfinite(x) for x in d):
        raise ValueError(f"distance curve has non-finite values: {d}")
    if tolerance < 0 or exclude_first < 0 or exclude_last < 0:
        raise ValueError("tolerance, exclude_first and exclude_last must be >= 0")
    lo = max(1, 1 + exclude_first)
    hi = min(n_layers - 1, n_layers - exclude_last)
    if hi - lo + 1 < 2:
        raise ValueError(
            f"only layers {lo}..{hi} of {n_layers} are allowed after exclusions: "
            "need at least 2 to form a band"
        )
    allowed = range(lo, hi + 1)
    dist = {layer: d[layer - 1] for layer in allowed}
    m = min(dist.values())
    threshold = m + tolerance * abs(m)

    def within(x: float) -> bool:
        return x <= threshold or math.isclose(x, threshold, rel_tol=1e-9, abs_tol=1e-12)

    runs: list[tuple[int, int]] = []
    start: int | None = None
    for layer in allowed:
        if within(dist[layer]):
            start = layer if start is None else start
        elif start is not None:
            runs.append((start, layer - 1))
            start = None
    if start is not None:
        runs.append((start, hi))

    def key(run: tuple[int, int]) -> tuple[int, float, int]:
        first, last = run
        return (-(last - first + 1), min(dist[x] for x in range(first, last + 1)), first)

    f, b = min(runs, key=key)
    if f == b:
        neighbours = [x for x in (f - 1, f + 1) if lo <= x <= hi]
        other = min(neighbours, key=lambda x: (dist[x], x))
        f, b = min(f, other), max(f, other)
    check_band(f, b, n_layers)
    return f, b


def language_id_accuracy(embeddings: Tensor, labels: Tensor, centroids: Tensor) -> float:
    """Fraction of ``embeddings [N, D]`` whose nearest centroid ``[K, D]`` (cosine) is its label.

    The inference-time language detector: the prompt's mean H_f against the language vectors.
    """
    if embeddings.dim() != 2 or centroids.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError("need embeddings [N, D], labels [N], centroids [K, D]")
    if embeddings.shape[0] == 0:
        raise ValueError("no embeddings to score")
    e = F.normalize(embeddings.float(), dim=-1)
    c = F.normalize(centroids.float().to(e.device), dim=-1)
    pred = (e @ c.t()).argmax(dim=-1)
    return float((pred == labels.to(pred.device)).float().mean())


def bitext_retrieval_accuracy(src: Tensor, tgt: Tensor, center: bool = False) -> float:
    """Fraction of ``src[i]`` whose nearest ``tgt`` row by cosine is its own pair ``tgt[i]``.

    ``center``: subtract each side's mean first. Raw mean-pooled residual states are dominated
    by a few huge-activation dimensions shared by every sentence (and by the language's own
    offset), which leaves cosine retrieval near chance; centring removes both.
    """
    if src.dim() != 2 or src.shape != tgt.shape:
        raise ValueError(f"need src and tgt of equal shape [N, D], got {src.shape}, {tgt.shape}")
    if src.shape[0] == 0:
        raise ValueError("no pairs to score")
    src, tgt = src.float(), tgt.float().to(src.device)
    if center:
        src, tgt = src - src.mean(dim=0), tgt - tgt.mean(dim=0)
    s = F.normalize(src, dim=-1)
    t = F.normalize(tgt, dim=-1)
    pred = (s @ t.t()).argmax(dim=-1)
    return float((pred == torch.arange(src.shape[0], device=pred.device)).float().mean())
