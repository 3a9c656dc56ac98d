"""Which MLflow model a run's export becomes.

A ShifCon export is logged as the pyfunc of `launcher/shifcon_pyfunc.py`, so that what the
registry serves generates with the shift on (a plain transformers model would serve the
unshifted backbone); any other export as an MLflow transformers model. Either way the model
is logged after the run's final metrics, with the final step, so the LoggedModel carries
the final metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from methods.shifcon.method import META_FILE, VECTORS_FILE

PYFUNC_CODE = Path(__file__).with_name("shifcon_pyfunc.py")
ROOT = Path(__file__).resolve().parents[1]
# The layers the pyfunc imports (ShiftedLM and below), copied into the model: it loads with
# the code it was trained with, without the project installed.
CODE_LAYERS = ("config", "data", "model", "methods")


def is_shifcon_export(directory: Path) -> bool:
    return (Path(directory) / META_FILE).is_file() and (Path(directory) / VECTORS_FILE).is_file()


def shifcon_signature() -> Any:
    """Rows of ``prompt`` (+ optional ``lang``) in; ``answer`` and the applied ``lang`` out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "prompt"), ColSpec("string", "lang", required=False)]),
        outputs=Schema([ColSpec("string", "answer"), ColSpec("string", "lang")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", 64),
                ParamSpec("system_prompt", "string", ""),
                ParamSpec("batch_size", "long", 8),
            ]
        ),
    )


def log_export(tracker: Any, export_dir: Path, step: int) -> str | None:
    """Log (and register) the export; returns the model URI, or None when not tracking."""
    if is_shifcon_export(export_dir):
        return tracker.log_pyfunc_model(
            export_dir,
            python_model=PYFUNC_CODE,
            code_paths=[str(ROOT / layer) for layer in CODE_LAYERS],
            signature=shifcon_signature(),
            step=step,
        )
    return tracker.log_hf_model(export_dir, step=step)
