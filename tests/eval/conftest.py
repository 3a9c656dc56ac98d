"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest

from eval.scorer import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    """The session's tiny Llama loaded once per module as (model, tokenizer)."""
    return load_model(tiny_model_dir, device="cpu")
