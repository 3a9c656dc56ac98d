"""Shared batching helpers: padding of id lists and equal rounds on every rank."""

from __future__ import annotations

import pytest
import torch

from data.batching import even_rounds
from data.formatting import IGNORE_INDEX, Example, collate, left_pad, right_pad


def test_right_and_left_pad_place_the_content_and_the_mask():
    seqs = [[5, 6, 7], [8], []]
    ids, mask = right_pad(seqs, pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, mask = left_pad(seqs, pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_collate_pads_ids_with_pad_and_labels_with_ignore():
    examples = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3], "en", "a"), Example([4], [4], "sw", "b")]
    batch = collate(examples, pad_id=0, languages=["en", "sw"])
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.lang_ids.tolist() == [0, 1]


@pytest.mark.parametrize("n_batches,world", [(5, 2), (4, 2), (1, 3), (7, 3), (0, 2)])
def test_even_rounds_same_count_on_every_rank_and_each_batch_once(n_batches, world):
    batches = [[i] for i in range(n_batches)]
    per_rank = [list(even_rounds(batches, rank, world)) for rank in range(world)]
    assert len({len(rounds) for rounds in per_rank}) == 1  # the same number of forwards
    real = sorted(b[0] for rounds in per_rank for b, filler in rounds if not filler)
    assert real == list(range(n_batches))  # every batch counted exactly once
    for rounds in per_rank:
        for batch, filler in rounds:
            if filler:
                assert batch == batches[0]
