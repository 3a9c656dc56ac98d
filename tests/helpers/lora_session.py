"""What a LoRA run's engine holds at its latest checkpoint: the method's logits and the full
(adapted) state dict, base and adapter weights under their peft names.

Run as ``python -m tests.helpers.lora_session RUN_DIR OUT.pt`` so DeepSpeed's global state never
leaks into the test process that loads the export with plain transformers and peft.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from config.recipe import load_recipe
from data.formatting import collate
from launcher.loop import open_session


def lora_session(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter and load what it saved."""
    from tests.helpers.runs import run_session_helper

    return run_session_helper("tests.helpers.lora_session", run_dir, workdir)


def main(run_dir: str, out: str) -> None:
    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    session = open_session(recipe, Path(run_dir))
    examples = [e for lang in session.data.languages for e in session.data.eval if e.lang == lang]
    examples = [e for i, e in enumerate(examples) if i % 2 == 0][:6]
    batch = collate(examples, session.tokenizer.pad_token_id, session.data.languages)
    logits = session.engine.forward_logits(batch)
    state = session.engine.full_state_dict()
    torch.save(
        {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "langs": [session.data.languages[i] for i in batch.lang_ids.tolist()],
            "logits": logits,
            "state": {k: v.detach().cpu().clone() for k, v in state.items()},
        },
        out,
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
