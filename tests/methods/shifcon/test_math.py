"""Tests of the ShifCon tensor math: language statistics, shift, MCL and LM losses, band check."""

from __future__ import annotations

import io
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from methods.shifcon.math import (
    LanguageStats,
    all_reduce_,
    check_band,
    combine_losses,
    language_stat_update,
    mcl_loss,
    sentence_embedding,
    shift_backward,
    shift_toward,
)

LANGS = ["en", "de", "sw"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so -0.0 vs 0.0 and NaN payloads count as differences."""
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def _batch(seed: int, b: int = 6, t: int = 5, d: int = 8, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=g)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    lang_ids = torch.randint(0, k, (b,), generator=g)
    return hidden, mask, lang_ids


# --------------------------------------------------------------------------- shift


def test_shift_toward_then_backward_is_identity_and_en_rows_bitwise() -> None:
    h, _, _ = _batch(0)
    lang_ids = torch.tensor([0, 1, 2, 1, 0, 2])
    vectors = torch.randn(3, 8, dtype=torch.float64)
    out = shift_backward(shift_toward(h, lang_ids, vectors, 0), lang_ids, vectors, 0)
    torch.testing.assert_close(out, h)
    en = lang_ids == 0
    assert torch.equal(_bits(out[en]), _bits(h[en]))


def test_shift_hand_computed_example() -> None:
    vectors = torch.tensor([[1.0, 2.0], [10.0, 20.0], [-4.0, 0.5]])  # en, de, sw
    h = torch.tensor(
        [
            [[0.0, 0.0], [1.0, 1.0]],  # de
            [[3.0, 4.0], [5.0, 6.0]],  # en
            [[2.0, -2.0], [0.0, 1.0]],  # sw
        ]
    )
    lang_ids = torch.tensor([1, 0, 2])
    toward = shift_toward(h, lang_ids, vectors, dominant=0)
    expected_toward = torch.tensor(
        [
            [[-9.0, -18.0], [-8.0, -17.0]],  # h - (10, 20) + (1, 2)
            [[3.0, 4.0], [5.0, 6.0]],  # unchanged
            [[7.0, -0.5], [5.0, 2.5]],  # h - (-4, 0.5) + (1, 2)
        ]
    )
    assert torch.equal(toward, expected_toward)
    backward = shift_backward(h, lang_ids, vectors, dominant=0)
    expected_backward = torch.tensor(
        [
            [[9.0, 18.0], [10.0, 19.0]],  # h - (1, 2) + (10, 20)
            [[3.0, 4.0], [5.0, 6.0]],
            [[-3.0, -3.5], [-5.0, -0.5]],  # h - (1, 2) + (-4, 0.5)
        ]
    )
    assert torch.equal(backward, expected_backward)


def test_dominant_rows_bitwise_identical_even_for_negative_zero_and_nan() -> None:
    h = torch.tensor([[[-0.0, float("nan"), 1e-30]], [[-0.0, 2.0, 3.0]]])
    lang_ids = torch.tensor([2, 1])  # dominant is 2 here
    vectors = torch.randn(3, 3)
    out = shift_toward(h, lang_ids, vectors, dominant=2)
    assert torch.equal(_bits(out[0]), _bits(h[0]))
    torch.testing.assert_close(out[1], h[1] - vectors[1] + vectors[2])


def test_mixed_language_batch_matches_per_sample_shift() -> None:
    h, _, lang_ids = _batch(1)
    vectors = torch.randn(3, 8)
    out = shift_toward(h, lang_ids, vectors, dominant=0)
    for i, lang in enumerate(lang_ids.tolist()):
        expected = h[i] if lang == 0 else h[i] - vectors[lang] + vectors[0]
        torch.testing.assert_close(out[i], expected)


def test_optional_mask_leaves_padding_untouched() -> None:
    h, mask, _ = _batch(2)
    lang_ids = torch.ones(6, dtype=torch.long)
    vectors = torch.randn(3, 8)
    out = shift_toward(h, lang_ids, vectors, 0, mask=mask)
    pad = mask == 0
    assert torch.equal(out[pad], h[pad])
    torch.testing.assert_close(out[~pad], h[~pad] - vectors[1] + vectors[0])


def test_bf16_stream_keeps_dtype_and_dominant_bits() -> None:
    h, _, _ = _batch(3)
    h = h.to(torch.bfloat16)
    lang_ids = torch.tensor([0, 1, 2, 0, 1, 2])
    vectors = torch.randn(3, 8, dtype=torch.float32)
    out = shift_toward(h, lang_ids, vectors, 0)
    assert out.dtype == torch.bfloat16
    en = lang_ids == 0
    assert torch.equal(_bits(out[en]), _bits(h[en]))
    delta = (vectors[0] - vectors[lang_ids[~en]]).to(torch.bfloat16).unsqueeze(1)
    assert torch.equal(out[~en], h[~en] + delta)
    back = shift_backward(out, lang_ids, vectors, 0)
    assert back.dtype == torch.bfloat16
    torch.testing.assert_close(back.float(), h.float(), atol=0.1, rtol=0.02)


def test_gradients_flow_to_h_not_to_vectors() -> None:
    h, _, lang_ids = _batch(4)
    h.requires_grad_(True)
    vectors = torch.randn(3, 8, requires_grad=True)
    out = shift_backward(shift_toward(h, lang_ids, vectors, 0), lang_ids, vectors, 0)
    (out * 3.0).sum().backward()
    assert h.grad is not None
    torch.testing.assert_close(h.grad, torch.full_like(h, 3.0))
    assert vectors.grad is None


def test_shift_rejects_bad_shapes() -> None:
    h, _, lang_ids = _batch(5)
    with pytest.raises(ValueError, match="vectors must be"):
        shift_toward(h, lang_ids, torch.randn(3, 7), 0)
    with pytest.raises(ValueError, match="lang_ids"):
        shift_toward(h, lang_ids[:3], torch.randn(3, 8), 0)


# --------------------------------------------------------------------------- statistics


def test_language_stat_update_matches_reference_loop() -> None:
    h, mask, lang_ids = _batch(6)
    h = h.to(torch.bfloat16)
    sums, counts = language_stat_update(h, mask, lang_ids, num_langs=4)
    assert sums.shape == (4, 8) and counts.shape == (4,) and sums.dtype == torch.float32
    ref_s, ref_c = torch.zeros(4, 8), torch.zeros(4)
    for i in range(h.shape[0]):
        for t in range(h.shape[1]):
            if mask[i, t]:
                ref_s[lang_ids[i]] += h[i, t].float()
                ref_c[lang_ids[i]] += 1
    torch.testing.assert_close(sums, ref_s)
    assert torch.equal(counts, ref_c)
    assert counts[3] == 0


def _fill(stats: LanguageStats, seed: int, n_batches: int) -> None:
    for j in range(n_batches):
        for layer in stats.layers:
            h, mask, lang_ids = _batch(seed * 100 + j * 10 + layer)
            stats.update(layer, h, mask, lang_ids)


def test_means_of_merged_halves_equal_means_of_union() -> None:
    layers = [2, 3]
    full, first, second = (LanguageStats.zeros(LANGS, layers, 8) for _ in range(3))
    _fill(full, seed=1, n_batches=4)
    for j in range(4):
        half = first if j < 2 else second
        for layer in layers:
            h, mask, lang_ids = _batch(100 + j * 10 + layer)
            half.update(layer, h, mask, lang_ids)
    flat = first.flat()
    assert flat.dim() == 1 and flat.is_contiguous()
    assert flat.numel() == 3 * 2 * 8 + 3 * 2
    merged = LanguageStats.zeros(LANGS, layers, 8)
    merged.load_flat(first.flat() + second.flat())  # what a SUM all-reduce does
    torch.testing.assert_close(merged.means(), full.means())
    assert torch.equal(merged.counts, full.counts)
    torch.testing.assert_close(merged.layer_means(3), full.means()[:, 1])
    assert full.sums.dtype == torch.float64


def test_add_of_delta_equals_direct_update() -> None:
    total = LanguageStats.zeros(LANGS, [1], 8)
    direct = LanguageStats.zeros(LANGS, [1], 8)
    for step in range(3):
        delta = total.zeros_like()
        _fill(delta, seed=step, n_batches=1)
        total.add_(delta)
        _fill(direct, seed=step, n_batches=1)
    torch.testing.assert_close(total.means(), direct.means())


def test_zero_count_error_names_language_and_layer() -> None:
    stats = LanguageStats.zeros(LANGS, [4, 7], 8)
    h, mask, _ = _batch(7)
    for layer in (4, 7):
        stats.update(layer, h, mask, torch.tensor([0, 2, 0, 2, 0, 2]))
    with pytest.raises(ValueError, match=r"language 'de' at layer 4"):
        stats.means()
    with pytest.raises(KeyError, match="layer 5"):
        stats.update(5, h, mask, torch.zeros(6, dtype=torch.long))


def test_state_dict_round_trip() -> None:
    stats = LanguageStats.zeros(LANGS, [3, 5], 8)
    _fill(stats, seed=3, n_batches=2)
    buf = io.BytesIO()
    torch.save(stats.state_dict(), buf)
    buf.seek(0)
    loaded = LanguageStats.from_state_dict(torch.load(buf))
    assert loaded.languages == LANGS and loaded.layers == [3, 5]
    assert torch.equal(loaded.sums, stats.sums) and torch.equal(loaded.counts, stats.counts)
    assert torch.equal(loaded.means(), stats.means())


def test_load_flat_rejects_wrong_size_and_all_reduce_is_noop_without_group() -> None:
    stats = LanguageStats.zeros(LANGS, [1], 4)
    with pytest.raises(ValueError, match="flat buffer"):
        stats.load_flat(torch.zeros(5))
    before = stats.flat().clone()
    assert all_reduce_(stats) is stats
    assert torch.equal(stats.flat(), before)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # stay on loopback
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        stats = LanguageStats.zeros(LANGS, [2, 3], 8)
        for j in range(rank * 2, rank * 2 + 2):  # this rank's shard of 4 batches
            for layer in stats.layers:
                h, mask, lang_ids = _batch(100 + j * 10 + layer)
                stats.update(layer, h, mask, lang_ids)
        real = dist.all_reduce
        calls: list[int] = []

        def counting(*args, **kwargs):  # a counter around the real collective, not a mock
            calls.append(1)
            return real(*args, **kwargs)

        dist.all_reduce = counting
        try:
            all_reduce_(stats)
        finally:
            dist.all_reduce = real
        torch.save(
            {"means": stats.means(), "counts": stats.counts, "calls": len(calls)},
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_all_reduce_two_gloo_processes(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert r0["calls"] == 1 and r1["calls"] == 1
    assert torch.equal(r0["means"], r1["means"]) and torch.equal(r0["counts"], r1["counts"])
    single = LanguageStats.zeros(LANGS, [2, 3], 8)
    for j in range(4):
        for layer in single.layers:
            h, mask, lang_ids = _batch(100 + j * 10 + layer)
            single.update(layer, h, mask, lang_ids)
    torch.testing.assert_close(r0["means"], single.means())
    assert torch.equal(r0["counts"], single.counts)


# --------------------------------------------------------------------------- MCL


def _pairs(seed: int, b: int = 6, t: int = 4, d: int = 16, n_layers: int = 2):
    """English hidden states and targets = English + a constant per-language offset."""
    g = torch.Generator().manual_seed(seed)
    lang_ids = torch.tensor([1, 1, 1, 2, 2, 2][:b])
    offsets = 3.0 * torch.randn(3, d, generator=g)
    offsets[0] = 0
    anchors, targets = [], []
    for _ in range(n_layers):
        e = torch.randn(b, t, d, generator=g)
        anchors.append(e)
        targets.append(e + offsets[lang_ids].unsqueeze(1))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, -1] = 0
    return anchors, targets, mask, lang_ids


def _sym_infonce(a: torch.Tensor, p: torch.Tensor, tau: float) -> torch.Tensor:
    logits = a @ p.t() / tau
    labels = torch.arange(a.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def test_sentence_embedding_is_unit_mean_over_content() -> None:
    h = torch.tensor([[[3.0, 0.0], [1.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(sentence_embedding(h, mask), torch.tensor([[1.0, 0.0]]))


def test_mcl_aligned_pairs_beat_shuffled_pairs() -> None:
    anchors, targets, mask, lang_ids = _pairs(0)
    aligned, per_layer = mcl_loss(anchors, targets, mask, mask, lang_ids, None, None, tau=0.1)
    assert per_layer.shape == (2,)
    torch.testing.assert_close(aligned, per_layer.mean())
    perm = torch.tensor([2, 0, 1, 5, 3, 4])  # shuffle pairs within each language
    shuffled_targets = [x[perm] for x in targets]
    shuffled, _ = mcl_loss(
        anchors, shuffled_targets, mask, mask[perm], lang_ids[perm], None, None, tau=0.1
    )
    assert aligned < shuffled - 1.0


def test_mcl_fallback_used_for_singleton_language_matches_hand_computation() -> None:
    anchors, targets, mask, _ = _pairs(1, b=3, n_layers=1)
    lang_ids = torch.tensor([1, 1, 2])  # sw has one sample -> stored vector
    g = torch.Generator().manual_seed(5)
    lang_fb = torch.randn(3, 1, 16, generator=g) * 7.0
    en_fb = torch.randn(1, 16, generator=g)
    loss, _ = mcl_loss(anchors, targets, mask, mask, lang_ids, en_fb, lang_fb, tau=0.7)

    a = F.normalize((anchors[0] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    s = F.normalize((targets[0] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    m_en = a.mean(0)  # 3 English samples: batch mean, not the fallback
    m = torch.stack([s[0:2].mean(0), s[0:2].mean(0), F.normalize(lang_fb[2, 0], dim=0)])
    p = F.normalize(s - m + m_en, dim=-1)
    torch.testing.assert_close(loss, _sym_infonce(a, p, 0.7))

    other_fb = lang_fb.clone()
    other_fb[1] += 100.0  # de has 2 samples: its stored vector must not matter
    same, _ = mcl_loss(anchors, targets, mask, mask, lang_ids, en_fb, other_fb, tau=0.7)
    torch.testing.assert_close(same, loss)
    other_fb[2] += 100.0
    changed, _ = mcl_loss(anchors, targets, mask, mask, lang_ids, en_fb, other_fb, tau=0.7)
    assert not torch.allclose(changed, loss)


def test_mcl_without_fallback_rejects_singleton_language() -> None:
    anchors, targets, mask, _ = _pairs(2, b=3, n_layers=1)
    with pytest.raises(ValueError, match="fewer than 2 samples"):
        mcl_loss(anchors, targets, mask, mask, torch.tensor([1, 1, 2]), None, None)
    one = [x[:1] for x in anchors]
    with pytest.raises(ValueError, match="dominant"):
        mcl_loss(one, one, mask[:1], mask[:1], torch.tensor([0]), None, torch.randn(3, 1, 16))
    loss, _ = mcl_loss(
        one, one, mask[:1], mask[:1], torch.tensor([1]), torch.randn(1, 16), torch.randn(3, 1, 16)
    )
    assert loss.item() == 0.0  # one pair: no negatives


def test_mcl_is_symmetric_in_anchor_and_target() -> None:
    # Targets are the same English sentences in another order: both batch means coincide, so
    # p = s(x) and swapping the roles transposes the logits; the symmetric loss must not move.
    anchors, _, mask, _ = _pairs(3)
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    targets = [x[perm] for x in anchors]
    en_ids = torch.zeros(6, dtype=torch.long)
    forward, _ = mcl_loss(anchors, targets, mask, mask[perm], en_ids, None, None, tau=0.5)
    swapped, _ = mcl_loss(targets, anchors, mask[perm], mask, en_ids, None, None, tau=0.5)
    torch.testing.assert_close(forward, swapped)
    a = sentence_embedding(anchors[0], mask)
    one_way = F.cross_entropy(a @ a[perm].t() / 0.5, torch.arange(6))
    assert not torch.allclose(forward, one_way)  # really the average of both directions


def test_mcl_gradients_reach_both_inputs() -> None:
    anchors, targets, mask, lang_ids = _pairs(4)
    anchors = [x.requires_grad_(True) for x in anchors]
    targets = [x.requires_grad_(True) for x in targets]
    loss, _ = mcl_loss(anchors, targets, mask, mask, lang_ids, None, None, tau=1.0)
    loss.backward()
    for x in anchors + targets:
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_mcl_tau_scales_logits() -> None:
    anchors, targets, mask, lang_ids = _pairs(5, n_layers=1)
    a = sentence_embedding(anchors[0], mask)
    s = sentence_embedding(targets[0], mask)
    m = torch.stack([s[:3].mean(0)] * 3 + [s[3:].mean(0)] * 3)
    p = F.normalize(s - m + a.mean(0), dim=-1)
    losses = {}
    for tau in (1.0, 0.25, 0.05):
        losses[tau], _ = mcl_loss(anchors, targets, mask, mask, lang_ids, None, None, tau=tau)
        torch.testing.assert_close(losses[tau], _sym_infonce(a, p, tau))
    assert losses[0.05] < losses[0.25] < losses[1.0]  # aligned pairs: sharper is lower
    with pytest.raises(ValueError, match="tau"):
        mcl_loss(anchors, targets, mask, mask, lang_ids, None, None, tau=0.0)


# --------------------------------------------------------------------------- LM, combine, band


def test_combine_losses_defaults() -> None:
    lm, mcl = torch.tensor(2.0), torch.tensor(3.0)
    assert combine_losses(lm, mcl).item() == pytest.approx(0.5 * 2.0 + 2.0 * 3.0)
    assert combine_losses(lm, mcl, alpha=1.0, beta=0.0).item() == pytest.approx(2.0)
    assert combine_losses(lm, None).item() == pytest.approx(1.0)


@pytest.mark.parametrize(("f", "b", "n"), [(1, 2, 3), (12, 15, 32), (1, 31, 32)])
def test_check_band_accepts_valid(f: int, b: int, n: int) -> None:
    check_band(f, b, n)


@pytest.mark.parametrize(("f", "b", "n"), [(0, 2, 4), (2, 2, 4), (3, 2, 4), (1, 4, 4), (1, 2, 2)])
def test_check_band_rejects_invalid(f: int, b: int, n: int) -> None:
    with pytest.raises(ValueError, match=r"1 <= f < b <= L-1"):
        check_band(f, b, n)
