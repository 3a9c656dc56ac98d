"""The MLflow pyfunc of a ShifCon export: greedy generation with the shift on.

MLflow "models from code": `launcher.serving.log_export` logs this file by path (MLflow copies
the source; no Python object is pickled), the export directory as the ``export`` artifact,
and the project's lower layers as ``code_paths``. At load time MLflow runs this file and calls
`ShiftedPyfunc.load_context`, which reads the weights (safetensors) and the ShifCon vectors
(``shifcon_vectors.safetensors`` + ``shifcon.json``) through ``ShiftedLM.from_export``.

Request: rows with ``prompt`` and optional ``lang``: a language of the export, ``auto``
(detected by ``ShiftedLM.detect``, the default) or ``none`` (no shift: the dominant
language's rows are returned unshifted). Params: ``max_new_tokens`` (64), ``system_prompt``
(none), ``batch_size`` (8). Answer: rows with ``answer`` and the ``lang`` that was applied.
"""

from __future__ import annotations

from typing import Any

from mlflow.models import set_model
from mlflow.pyfunc import PythonModel

NO_SHIFT = "none"
AUTO = "auto"


class ShiftedPyfunc(PythonModel):
    def load_context(self, context: Any) -> None:
        import torch

        from methods.shifcon.infer import ShiftedLM

        config = context.model_config or {}
        dtype = getattr(torch, str(config.get("dtype", "float32")))
        self.lm = ShiftedLM.from_export(context.artifacts["export"], dtype=dtype)

    def predict(self, context, model_input, params=None):
        """``model_input``: a DataFrame (or rows) of ``prompt`` [+ ``lang``]. No type hints:
        MLflow would read them as an input schema besides the logged signature (and warn)."""
        import pandas as pd

        params = params or {}
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in frame:
            raise ValueError("ShifCon model: every row needs a 'prompt'")
        prompts = [str(p) for p in frame["prompt"]]
        asked = [AUTO] * len(prompts)
        if "lang" in frame:
            asked = [AUTO if v is None or v != v or v == "" else str(v) for v in frame["lang"]]
        system = params.get("system_prompt") or None
        langs = self.languages_for(prompts, asked, system)
        applied = [self.lm.languages[0] if lang == NO_SHIFT else lang for lang in langs]
        size = max(1, int(params.get("batch_size", 8)))
        answers: list[str] = []
        for start in range(0, len(prompts), size):
            answers += self.lm.generate(
                prompts[start : start + size],
                applied[start : start + size],
                max_new_tokens=int(params.get("max_new_tokens", 64)),
                system_prompt=system,
            )
        return pd.DataFrame({"answer": answers, "lang": langs})

    def languages_for(self, prompts: list[str], asked: list[str], system: str | None) -> list[str]:
        """Each row's language: as asked, or detected for ``auto``; unknown ones are refused."""
        known = set(self.lm.languages) | {AUTO, NO_SHIFT}
        bad = sorted({lang for lang in asked if lang not in known})
        if bad:
            raise ValueError(
                f"ShifCon model: languages {bad} have no vectors; use one of "
                f"{self.lm.languages}, '{AUTO}' or '{NO_SHIFT}'"
            )
        auto = [i for i, lang in enumerate(asked) if lang == AUTO]
        langs = list(asked)
        if auto:
            for i, lang in zip(
                auto, self.lm.detect([prompts[i] for i in auto], system), strict=True
            ):
                langs[i] = lang
        return langs


set_model(ShiftedPyfunc())
