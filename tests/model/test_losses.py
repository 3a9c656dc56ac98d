"""The LM loss shared by every method and engine."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from data.formatting import Batch
from methods.base import lm_loss
from model.losses import per_sample_lm_loss


def test_per_sample_loss_shifts_and_ignores_prompt():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100
    sums, counts = per_sample_lm_loss(logits, labels)
    assert counts.tolist() == [4.0, 2.0]
    for row in range(2):
        expected = F.cross_entropy(
            logits[row, :-1], labels[row, 1:], ignore_index=-100, reduction="sum"
        )
        torch.testing.assert_close(sums[row], expected)
    assert per_sample_lm_loss(logits.bfloat16(), labels)[0].dtype == torch.float32


def test_micro_batch_shares_add_up_to_the_global_token_mean():
    """Two micro-batches with different token counts: their shares (each over the global
    normaliser) sum to the token mean of the whole batch, which per-micro means would not."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g)
    labels = torch.randint(0, 9, (4, 6), generator=g)
    labels[0, :4] = -100  # fewer supervised tokens in the first micro-batch
    ids, mask = torch.zeros(4, 6, dtype=torch.long), torch.ones(4, 6, dtype=torch.long)
    full = Batch(ids, mask, labels, torch.zeros(4, dtype=torch.long))
    total_tokens = int((labels[:, 1:] != -100).sum())
    accum = 2  # one rank, two accumulation steps: the normaliser is tokens / 2
    shares = []
    for rows in (slice(0, 2), slice(2, 4)):
        micro = replace(full, labels=labels[rows], token_normalizer=total_tokens / accum)
        shares.append(lm_loss(logits[rows], micro))
    expected = F.cross_entropy(
        logits[:, :-1].reshape(-1, 9), labels[:, 1:].reshape(-1), ignore_index=-100
    )
    torch.testing.assert_close(sum(shares) / accum, expected)
