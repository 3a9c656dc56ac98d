"""Method name -> implementation (the recipe's `method.name`)."""

from __future__ import annotations

from methods.base import SFT, Method


def build_method(recipe, data, tokenizer) -> Method:
    name = recipe.method.name
    if name == "sft":
        return SFT()
    common = {
        "languages": data.languages,
        "tokenizer": tokenizer,
        "train_rows": data.train_rows,
        "seed": recipe.training.seed,
        "on_bad_row": recipe.data.on_bad_row,
    }
    if name == "shifcon":
        from methods.shifcon.method import ShifCon

        return ShifCon(recipe.method, **common)
    if name == "lens":
        from methods.lens import Lens

        return Lens(recipe.method, **common, system_prompt=recipe.data.system_prompt)
    raise ValueError(f"method.name: no implementation for {name!r}")
