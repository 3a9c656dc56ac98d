"""The DeepSpeed config, generated from the recipe; `parallel.deepspeed` has the last word."""

from __future__ import annotations

import copy
from typing import Any

from config.schema import Recipe
from parallel.distributed import Device


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_precision(recipe: Recipe, device: Device) -> str:
    if recipe.parallel.precision != "auto":
        return recipe.parallel.precision
    return "bf16" if device == "cuda" else "fp32"


def build_deepspeed_config(recipe: Recipe, device: Device) -> dict[str, Any]:
    t, p = recipe.training, recipe.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 3:
        zero.update(
            # The export gathers full weights on rank 0 without a second copy of the model.
            stage3_gather_16bit_weights_on_model_save=True,
            overlap_comm=device == "cuda",
            contiguous_gradients=True,
        )
        if p.offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": device == "cuda"}
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device == "cuda"}
    config: dict[str, Any] = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        # The loop sets the learning rate every step (one schedule for every engine).
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": list(t.betas),
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                # Fused/CPU-Adam kernels need a build step; torch's AdamW runs everywhere.
                "torch_adam": device != "cuda",
            },
        },
        "bf16": {"enabled": resolve_precision(recipe, device) == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "seed": t.seed,
    }
    return deep_merge(config, p.deepspeed)
