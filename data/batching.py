"""Deterministic global batches that can be resumed from (epoch, index) alone.

The order of an epoch is a pure function of (seed, epoch), so a checkpoint only needs the data
position; no sampler state, no iterator pickling.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from config.errors import UserError

# Sort by length inside windows of this many global batches: most of bucketing's padding gain,
# while batches still mix lengths, languages and tasks across an epoch.
BUCKET_WINDOW = 32

T = TypeVar("T")


def epoch_batches(
    lengths: Sequence[int], global_batch_size: int, seed: int, epoch: int, bucket: bool
) -> list[list[int]]:
    """Global batches of indices for one epoch; the incomplete tail is dropped."""
    if len(lengths) < global_batch_size:
        raise UserError(
            f"training.global_batch_size ({global_batch_size}) is larger than the training set "
            f"({len(lengths)} examples)"
        )
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if bucket:
        span = global_batch_size * BUCKET_WINDOW
        order = [
            i
            for start in range(0, len(order), span)
            for i in sorted(order[start : start + span], key=lambda j: lengths[j])
        ]
    batches = [
        order[start : start + global_batch_size]
        for start in range(0, len(order) - global_batch_size + 1, global_batch_size)
    ]
    if bucket:
        rng.shuffle(batches)  # sorted windows would otherwise run short-to-long
    return batches


def rank_micro_batches(
    global_batch: Sequence[int], micro_batch_size: int, dp_rank: int, dp_size: int
) -> list[list[int]]:
    """This data-parallel rank's micro-batches (gradient-accumulation steps) of a global batch."""
    per_rank = len(global_batch) // dp_size
    mine = global_batch[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    return [list(mine[i : i + micro_batch_size]) for i in range(0, per_rank, micro_batch_size)]


def even_rounds(
    batches: Sequence[Sequence[T]], rank: int, world: int
) -> Iterator[tuple[Sequence[T], bool]]:
    """This rank's share of ``batches`` (round robin) as ``(batch, filler)``, the same number of
    rounds on every rank: under ZeRO-3 a forward is a collective, so a rank short of work
    repeats ``batches[0]`` with ``filler`` True and must discard what it computes."""
    mine = batches[rank::world]
    for r in range(-(-len(batches) // world)):
        yield (mine[r], False) if r < len(mine) else (batches[0], True)


@dataclass
class DataPosition:
    """Where the loop is in the data: the next global batch is batches(epoch)[index]."""

    epoch: int = 0
    index: int = 0

    def advance(self, batches_per_epoch: int) -> None:
        self.index += 1
        if self.index >= batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0


class GlobalBatchStream:
    """Yields global batches forever, epoch after epoch, from a resumable position."""

    def __init__(
        self,
        lengths: Sequence[int],
        global_batch_size: int,
        seed: int,
        bucket: bool,
        position: DataPosition | None = None,
    ) -> None:
        self._lengths = list(lengths)
        self._size = global_batch_size
        self._seed = seed
        self._bucket = bucket
        self.position = position or DataPosition()
        self._cache: tuple[int, list[list[int]]] | None = None

    def _batches(self, epoch: int) -> list[list[int]]:
        if self._cache is None or self._cache[0] != epoch:
            batches = epoch_batches(self._lengths, self._size, self._seed, epoch, self._bucket)
            self._cache = (epoch, batches)
        return self._cache[1]

    def next(self) -> list[int]:
        batches = self._batches(self.position.epoch)
        batch = batches[self.position.index]
        self.position.advance(len(batches))
        return batch
