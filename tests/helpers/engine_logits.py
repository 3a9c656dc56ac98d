"""Logits of the training engine restored from a run directory's latest checkpoint.

Run as ``python -m tests.helpers.engine_logits RUN_DIR OUT.pt`` so DeepSpeed's global state never
leaks into the test process that loads the export with plain transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from config.recipe import load_recipe
from data.formatting import collate
from launcher.loop import open_session


def engine_logits(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter and load what it saved."""
    from tests.helpers.runs import run_session_helper

    return run_session_helper("tests.helpers.engine_logits", run_dir, workdir)


def capture(run_dir: str | Path, *, with_state: bool = False) -> dict[str, Any]:
    """The engine's logits on held-out samples (and, with `with_state`, its full state dict,
    base and adapter weights under their peft names), as plain tensors for torch.save."""
    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    session = open_session(recipe, Path(run_dir))
    # Two samples of every language: the method's forward (e.g. a per-language shift) shows.
    examples = [e for lang in session.data.languages for e in session.data.eval if e.lang == lang]
    examples = [e for i, e in enumerate(examples) if i % 2 == 0][:6]
    batch = collate(examples, session.tokenizer.pad_token_id, session.data.languages)
    saved = {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "langs": [session.data.languages[i] for i in batch.lang_ids.tolist()],
        "logits": session.engine.forward_logits(batch),
    }
    if with_state:
        state = session.engine.full_state_dict()
        saved["state"] = {k: v.detach().cpu().clone() for k, v in state.items()}
    return saved


def main(run_dir: str, out: str) -> None:
    torch.save(capture(run_dir), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
