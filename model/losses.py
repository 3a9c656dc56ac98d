"""Language-model losses as plain tensor functions (shared by both engines and evaluation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.formatting import IGNORE_INDEX


def per_sample_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and label-token count per sample (float32), for exact averaging
    over languages and ranks, which a per-batch mean cannot give."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    token_loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    valid = shift_labels != IGNORE_INDEX
    return (token_loss * valid).sum(dim=1), valid.sum(dim=1).float()
