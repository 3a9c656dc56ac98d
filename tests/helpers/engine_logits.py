"""Logits of the training engine restored from a run directory's latest checkpoint.

Run as ``python -m tests.helpers.engine_logits RUN_DIR OUT.pt`` so DeepSpeed's global state never
leaks into the test process that loads the export with plain transformers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from config.recipe import load_recipe
from data.formatting import collate
from launcher.loop import open_session


def engine_logits(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter and load what it saved."""
    out = workdir / "engine_logits.pt"
    from tests.helpers.runs import clean_env

    env = {**clean_env(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.helpers.engine_logits", str(run_dir), str(out)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def main(run_dir: str, out: str) -> None:
    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    session = open_session(recipe, Path(run_dir))
    # Two samples of every language: the method's forward (e.g. a per-language shift) shows.
    examples = [e for lang in session.data.languages for e in session.data.eval if e.lang == lang]
    examples = [e for i, e in enumerate(examples) if i % 2 == 0][:6]
    batch = collate(examples, session.tokenizer.pad_token_id, session.data.languages)
    logits = session.engine.forward_logits(batch)
    torch.save(
        {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "langs": [session.data.languages[i] for i in batch.lang_ids.tolist()],
            "logits": logits,
        },
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
