"""Method name -> what the method is made of: the one place that knows every method.

An entry declares the method's recipe section (a class of config/schema.py), how it is built
(its Hugging Face attachment and state are the `Method` it returns: `attach`, `state_dict`), its
megatron stage (None: deepspeed only, which is a recipe error), the recipe checks it needs and
the activations it adds to a memory plan. Engines, the loop and the planner ask the registry;
none of them names a method, so a fourth method is one more entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from config.errors import UserError
from config.schema import LensMethod, SFTMethod, ShifConMethod
from methods.base import SFT, ExtraActivations, MegatronStage, Method, StageContext

Build = Callable[[Any, Any, Any], Method]  # (recipe, run data, tokenizer) -> method
FieldErrors = Callable[..., list[str]]


def _none(*_: Any) -> Any:
    return None


def _no_errors(*_: Any) -> list[str]:
    return []


@dataclass(frozen=True)
class MethodEntry:
    name: str
    section: type  # the recipe's method section (config/schema.py)
    build: Build
    megatron: Callable[[], type[MegatronStage]] | None  # lazy: megatron imports are heavy
    recipe_errors: FieldErrors = _no_errors  # (section, recipe) -> engine-dependent errors
    backbone_errors: FieldErrors = _no_errors  # (section, decoder layers) -> misfits
    plan_extras: Callable[[Any, int], ExtraActivations | None] = _none  # (section, layers)
    lora: bool = True  # LoRA (recipe `lora:`) can train it


def _common(recipe, data, tokenizer) -> dict[str, Any]:
    return {
        "languages": data.languages,
        "tokenizer": tokenizer,
        "train_rows": data.train_rows,
        "seed": recipe.training.seed,
        "on_bad_row": recipe.data.on_bad_row,
    }


# -- shifcon ------------------------------------------------------------------------------


def _build_shifcon(recipe, data, tokenizer) -> Method:
    from methods.shifcon.method import ShifCon

    return ShifCon(recipe.method, **_common(recipe, data, tokenizer))


def _shifcon_stage() -> type[MegatronStage]:
    from methods.shifcon.megatron import ShifConStage

    return ShifConStage


def _shifcon_recipe_errors(section: ShifConMethod, recipe) -> list[str]:
    errors = []
    if recipe.parallel.engine == "megatron" and section.shift_positions != "all":
        errors.append(
            "method.shift_positions: prompt needs the deepspeed engine (the megatron stage "
            "shifts every position)"
        )
    return errors


def _shifcon_backbone_errors(section: ShifConMethod, layers: int) -> list[str]:
    if section.band == "auto":
        return []
    f, b = section.band
    if 1 <= f < b <= layers - 1:
        return []
    return [
        f"method.band: ({f}, {b}) does not fit the {layers}-layer backbone "
        f"(need 1 <= f < b <= {layers - 1})"
    ]


def _shifcon_plan(section: ShifConMethod, layers: int) -> ExtraActivations:
    # band: auto is picked at run time; plan for the deepest band the metric may choose.
    depth = section.band[1] - 1 if isinstance(section.band, tuple | list) else layers - 2
    return ExtraActivations(
        "ShifCon contrastive (layers 1..b-1)",
        sequences=2 * section.mcl_batch_size,
        seq_len=section.pairs.max_length,
        depth=depth,
    )


# -- lens ---------------------------------------------------------------------------------


def _build_lens(recipe, data, tokenizer) -> Method:
    from methods.lens import Lens

    common = _common(recipe, data, tokenizer)
    return Lens(recipe.method, **common, system_prompt=recipe.data.system_prompt)


def _lens_stage() -> type[MegatronStage]:
    from methods.lens_megatron import LensStage

    return LensStage


def _lens_recipe_errors(section: LensMethod, recipe) -> list[str]:
    # megatron-core's recomputation is reentrant: a recomputed layer whose input needs no
    # gradient (the frozen layers' output) gets none for its weights (measured: grad norm 0).
    if recipe.parallel.engine == "megatron" and recipe.model.gradient_checkpointing:
        return [
            "model.gradient_checkpointing: Lens on the megatron engine does not support it "
            "(megatron's reentrant recomputation gives no gradient to a layer whose input comes "
            "from frozen layers); set it to false: only the top k layers keep activations"
        ]
    return []


def _lens_backbone_errors(section: LensMethod, layers: int) -> list[str]:
    if section.top_k < layers:
        return []
    return [f"method.top_k: {section.top_k} must be below the backbone's {layers} layers"]


METHODS: dict[str, MethodEntry] = {
    "sft": MethodEntry("sft", SFTMethod, lambda *_: SFT(), megatron=lambda: MegatronStage),
    "shifcon": MethodEntry(
        "shifcon",
        ShifConMethod,
        _build_shifcon,
        megatron=_shifcon_stage,
        recipe_errors=_shifcon_recipe_errors,
        backbone_errors=_shifcon_backbone_errors,
        plan_extras=_shifcon_plan,
    ),
    "lens": MethodEntry(
        "lens",
        LensMethod,
        _build_lens,
        megatron=_lens_stage,
        recipe_errors=_lens_recipe_errors,
        backbone_errors=_lens_backbone_errors,
        lora=False,  # trains whole top layers against theta_0's states
    ),
}


def entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise UserError(f"method.name: no implementation for {name!r}")
    return METHODS[name]


def build_method(recipe, data, tokenizer) -> Method:
    return entry(recipe.method.name).build(recipe, data, tokenizer)


def recipe_errors(recipe) -> list[str]:
    """What the method says about the rest of the recipe (e.g. the engine), field-named."""
    found = entry(recipe.method.name)
    errors = []
    if recipe.parallel.engine == "megatron" and found.megatron is None:
        errors.append(_deepspeed_only(found.name))
    return errors + _lora_errors(found, recipe) + found.recipe_errors(recipe.method, recipe)


def _lora_errors(found: MethodEntry, recipe) -> list[str]:
    """LoRA (model/lora.py) is built on the deepspeed engine only, for methods that train
    through the HF forward without choosing their own trainable weights."""
    lora = getattr(recipe, "lora", None)
    if lora is None or not lora.enabled:
        return []
    errors = []
    if recipe.parallel.engine == "megatron":
        errors.append(
            "lora.enabled: LoRA runs on the deepspeed engine only (parallel.engine: megatron "
            "has no adapter path); set parallel.engine: deepspeed or lora.enabled: false"
        )
    if not found.lora:
        errors.append(
            f"lora.enabled: method {found.name} chooses its own trainable weights; "
            "LoRA supports sft and shifcon (and CrossIn data with either)"
        )
    if lora.quantize != "none":
        errors.append(
            f"lora.quantize: {lora.quantize} (QLoRA) needs bitsandbytes on a CUDA device, and "
            "the deepspeed engine does not load 4-bit bases yet; use lora.quantize: none"
        )
    return errors


def backbone_errors(section, layers: int) -> list[str]:
    """What does not fit a decoder of `layers` layers (known before any work for a local one)."""
    return entry(section.name).backbone_errors(section, layers)


def plan_extras(section, layers: int) -> ExtraActivations | None:
    return entry(section.name).plan_extras(section, layers)


def megatron_stage_class(name: str) -> type[MegatronStage]:
    """The method's megatron stage; a UserError naming the field when it has none."""
    found = entry(name)
    if found.megatron is None:
        raise UserError(_deepspeed_only(name))
    return found.megatron()


def build_megatron_stage(method: Method, where: StageContext) -> MegatronStage:
    return megatron_stage_class(method.name)(method, where)


def _deepspeed_only(name: str) -> str:
    return f"method.name: {name} runs on the deepspeed engine only (parallel.engine)"
