"""Tests of the subspace decomposition, distance metric, band selection and accuracies."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from methods.shifcon.math import check_band
from methods.subspace import (
    agnostic_direction,
    bitext_retrieval_accuracy,
    decompose,
    language_id_accuracy,
    mean_distance_per_layer,
    per_layer_distances,
    project,
    project_direction,
    select_band,
    subspace_distance,
)

D = 12


def _orthonormal(n: int, seed: int) -> torch.Tensor:
    """n + 1 orthonormal vectors in R^D: column 0 for the agnostic part, the rest offsets."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, n + 1, generator=g, dtype=torch.float64))
    return q


def test_decompose_recovers_agnostic_and_specific_subspace() -> None:
    q = _orthonormal(3, seed=0)
    agnostic = 5.0 * q[:, 0]
    offset_dirs = q[:, 1:]  # [D, 3]
    coeffs = torch.tensor([[2.0, -1.0, 0.5, 1.0], [0.0, 3.0, -2.0, 1.0], [1.0, 1.0, 1.0, -4.0]])
    coeffs = coeffs.double()
    coeffs = coeffs - coeffs.mean(dim=1, keepdim=True)  # offsets sum to zero over languages
    means = agnostic + (offset_dirs @ coeffs).t()  # [K=4, D]
    dec = decompose(means)
    torch.testing.assert_close(dec.agnostic, agnostic)
    u = dec.specific_basis
    assert u.shape == (D, 3)
    torch.testing.assert_close(u.t() @ u, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(u @ u.t(), offset_dirs @ offset_dirs.t())
    torch.testing.assert_close(agnostic_direction(dec), q[:, 0])
    assert decompose(means, rank=1).specific_basis.shape == (D, 1)
    assert torch.equal(decompose(means).specific_basis, u)  # deterministic signs
    assert decompose(means.float()).agnostic.dtype == torch.float32
    with pytest.raises(ValueError, match="rank"):
        decompose(means, rank=4)
    with pytest.raises(ValueError, match="at least 2"):
        decompose(means[:1])


def test_projections() -> None:
    q = _orthonormal(2, seed=1)
    basis = q[:, 1:]
    inside = 2.0 * q[:, 1] - q[:, 2]
    torch.testing.assert_close(project(inside, basis), inside)
    torch.testing.assert_close(project(q[:, 0], basis), torch.zeros(D, dtype=torch.float64))
    batch = torch.stack([inside + 3.0 * q[:, 0], q[:, 0]])
    torch.testing.assert_close(
        project(batch, basis), torch.stack([inside, torch.zeros(D)]).double()
    )
    along = project_direction(batch, 10.0 * q[:, 0])
    torch.testing.assert_close(along, torch.stack([3.0 * q[:, 0], q[:, 0]]))


def _ordered_means(seed: int, scales: list[float], en_norm: float = 4.0) -> torch.Tensor:
    """v^en = g, v^X = g + scale_X * q_X with q_X orthonormal and orthogonal to g."""
    q = _orthonormal(len(scales), seed)
    g = en_norm * q[:, 0]
    rows = [g] + [g + s * q[:, i + 1] for i, s in enumerate(scales)]
    return torch.stack(rows)


def test_subspace_distance_zero_for_en_and_ordered_as_constructed() -> None:
    means = _ordered_means(2, [1.0, 3.0, 2.0])
    dist = subspace_distance(means, dominant_idx=0)
    torch.testing.assert_close(dist, torch.tensor([0.0, 1.0, 3.0, 2.0], dtype=torch.float64) / 4)
    assert dist[0].item() == 0.0
    assert dist.argsort().tolist() == [0, 1, 3, 2]
    with pytest.raises(ValueError, match="dominant_idx"):
        subspace_distance(means, dominant_idx=4)


def test_per_layer_distances_and_mean_curve() -> None:
    stacked = torch.stack([_ordered_means(s, [1.0, 2.0], en_norm=2.0 + s) for s in range(3)])
    dist = per_layer_distances(stacked, dominant_idx=0)
    assert dist.shape == (3, 3)
    for layer in range(3):
        torch.testing.assert_close(dist[layer], subspace_distance(stacked[layer], 0))
    curve = mean_distance_per_layer(dist, dominant_idx=0)
    assert curve == pytest.approx([1.5 / (2.0 + s) for s in range(3)])


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([5, 5, 4, 3, 1, 1.05, 1.02, 1, 3, 4, 5, 5], (5, 8)),  # clear valley
        ([5, 1, 1, 5, 1, 1, 5, 5], (2, 3)),  # tie, equal minima: earliest run
        ([5, 1.05, 1.05, 5, 1, 1.02, 5, 5], (5, 6)),  # tie: run containing the minimum
        ([5, 1, 5, 1.05, 1.05, 1.05, 5, 5], (4, 6)),  # longest run beats deepest layer
        ([2.0] * 10, (2, 9)),  # flat: whole allowed range
        ([0.1, 1, 1, 1, 2, 3, 4, 5], (2, 4)),  # minimum at the first layer is excluded
        ([5, 4, 3, 1, 1, 1, 2, 0.01], (4, 6)),  # minimum at the last layer is excluded
        ([5, 5, 5, 1, 3, 2, 5, 5], (4, 5)),  # single-layer valley: better neighbour
        ([5, 5, 3, 1, 3, 5, 5], (3, 4)),  # single layer, equal neighbours: earlier
        ([5, 1, 9, 9, 9, 9], (2, 3)),  # single layer at the allowed edge
    ],
)
def test_select_band_cases(curve: list[float], expected: tuple[int, int]) -> None:
    assert select_band(curve) == expected


def test_select_band_tolerance_and_exclusions() -> None:
    curve = [5, 3, 1.0, 1.2, 1.3, 3, 5, 5]
    assert select_band(curve, tolerance=0.1) == (3, 4)  # only 1.0: single layer, extended
    assert select_band(curve, tolerance=0.25) == (3, 4)
    assert select_band(curve, tolerance=0.3) == (3, 5)
    assert select_band([1.0] * 6, exclude_first=0, exclude_last=0) == (1, 5)  # b <= L-1 still
    assert select_band([1.0] * 10, exclude_first=3, exclude_last=2) == (4, 8)
    with pytest.raises(ValueError, match="at least 2"):
        select_band([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="non-finite"):
        select_band([1.0, float("nan"), 1.0, 1.0, 1.0])


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=4, max_size=40),
    st.floats(0.0, 1.0),
)
def test_select_band_property(curve: list[float], tolerance: float) -> None:
    f, b = select_band(curve, tolerance=tolerance)
    check_band(f, b, len(curve))
    assert f >= 2 and b <= len(curve) - 1
    allowed_min = min(curve[1:-1])
    threshold = allowed_min * (1 + tolerance) + 1e-7
    inside = [curve[layer - 1] <= threshold for layer in range(f, b + 1)]
    assert all(inside) or (b - f == 1 and any(inside))


def test_language_id_accuracy_hand_made() -> None:
    centroids = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    emb = torch.tensor([[2.0, 0.1], [0.1, 3.0], [1.0, 0.9], [-1.0, 0.5]])
    labels = torch.tensor([0, 1, 1, 1])  # the third is nearer centroid 0
    assert language_id_accuracy(emb, labels, centroids) == pytest.approx(0.75)
    assert language_id_accuracy(emb[:2], labels[:2], 5.0 * centroids) == 1.0


def test_bitext_retrieval_accuracy_hand_made() -> None:
    src = torch.eye(3)
    assert bitext_retrieval_accuracy(src, 2.0 * src) == 1.0
    tgt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.1]])
    assert bitext_retrieval_accuracy(src, tgt) == pytest.approx(1 / 3)
    with pytest.raises(ValueError):
        bitext_retrieval_accuracy(src, tgt[:2])
