"""Equal rounds on every rank: ZeRO-3 forwards are collectives, so no rank may run fewer."""

from __future__ import annotations

import pytest

from data.batching import even_rounds


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
