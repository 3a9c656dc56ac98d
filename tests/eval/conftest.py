"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest
import torch

from eval.scorer import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The session's tiny Llama loaded once per module as (model, tokenizer)."""
    return load_model(tiny_model_dir, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
