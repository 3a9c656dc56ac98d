"""What a LoRA run's engine holds at its latest checkpoint: the method's logits and the full
(adapted) state dict, base and adapter weights under their peft names.

Run as ``python -m tests.helpers.lora_session RUN_DIR OUT.pt`` so DeepSpeed's global state never
leaks into the test process that loads the export with plain transformers and peft.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.helpers.engine_logits import capture


def lora_session(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter and load what it saved."""
    from tests.helpers.runs import run_session_helper

    return run_session_helper("tests.helpers.lora_session", run_dir, workdir)


def main(run_dir: str, out: str) -> None:
    torch.save(capture(run_dir, with_state=True), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
