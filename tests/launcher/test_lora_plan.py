"""The memory planner with LoRA: the adapters' parameter count is peft's, and only they carry
gradients and optimizer state (the frozen base is stored, never optimised)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from config.errors import UserError
from config.schema import LoraSection, Recipe
from parallel.arch import KNOWN_ARCHS, arch_from_config, resolve_arch, with_lora
from parallel.plan import Layout, Workload, ZeroBuffers, make_plan, model_states, step_transient

GB = 1e9


def test_trainable_count_is_what_peft_creates(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from model.lora import apply_lora

    config = json.loads((tiny_model_dir / "config.json").read_text())
    for section in (
        LoraSection(enabled=True, rank=4),
        LoraSection(enabled=True, rank=8, target_modules=["q_proj", "mlp.down_proj"], layers=[2]),
        LoraSection(enabled=True, rank=2, target_modules="all-linear", layers=[1, 4]),
    ):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        created = apply_lora(model, section)
        assert with_lora(arch_from_config(config, "tiny"), section).trainable_params == created


def test_llama_7b_r16_all_linears_is_the_known_40m():
    """Llama-2-7B, r=16 on q,k,v,o,gate,up,down: 39,976,960 adapter parameters (peft's
    print_trainable_parameters figure for this setup)."""
    arch = with_lora(KNOWN_ARCHS["llama-7b"], LoraSection(enabled=True, rank=16))
    assert arch.trainable_params == 39_976_960
    assert "LoRA r=16 on 32/32 layers, 39.98M trainable" in arch.name


def test_lora_lowers_the_estimate_by_the_optimizer_and_gradient_states():
    full = KNOWN_ARCHS["llama-7b"]
    lora = with_lora(full, LoraSection(enabled=True, rank=16, dropout=0.0))
    p, t, n = full.total_params, lora.trainable_params, 8
    layout, zero = Layout("deepspeed", world=n, zero_stage=3), ZeroBuffers()
    a, b = model_states(full, layout, zero), model_states(lora, layout, zero)
    assert b["params (16-bit, /N)"] == a["params (16-bit, /N)"] == 2 * p / n  # base stored
    assert b["optimizer of the adapters (fp32 master+m+v, /N)"] == 12 * t / n
    assert a["optimizer (fp32 master+m+v, /N)"] == 12 * p / n
    assert b["grads of the adapters (16-bit, /N)"] == 2 * t / n
    saved = sum(a.values()) - sum(b.values())
    # 12 optimizer + 2 gradient bytes per frozen parameter, and the gathered layer's gradient.
    assert saved == pytest.approx(14 * (p - t) / n + 2 * full.largest_layer_params)
    assert saved / GB == pytest.approx(11.98, abs=0.01)  # of 14.0 GB of states per GPU
    assert step_transient(lora, layout, zero) == 4 * t / n
    # ZeRO-1: only the optimizer is sharded; LoRA still removes 12 bytes per frozen parameter.
    z1 = replace(layout, zero_stage=1)
    one = model_states(full, z1, zero)["optimizer (fp32 master+m+v, /N)"]
    assert one - model_states(lora, z1, zero)[
        "optimizer of the adapters (fp32 master+m+v, /N)"
    ] == (pytest.approx(12 * (p - t) / n))


def test_plan_from_a_recipe_and_adapter_activations(tiny_model_dir):
    recipe = Recipe(
        name="x", model={"backbone": str(tiny_model_dir)}, lora={"enabled": True, "rank": 4}
    )
    arch = resolve_arch(recipe)
    assert arch.lora is not None and "LoRA r=4 on 4/4 layers" in arch.name
    assert resolve_arch(Recipe(name="x", model={"backbone": str(tiny_model_dir)})).lora is None
    layout, zero = Layout("deepspeed", world=2), ZeroBuffers()
    work = Workload(seq=128, micro_batch=2, checkpointing=False)
    no_drop = replace(arch, lora=replace(arch.lora, dropout=False))
    full = replace(arch, lora=None)
    plans = {a: make_plan(x, layout, work, zero, 80 * GB) for a, x in
             (("drop", arch), ("no_drop", no_drop), ("full", full))}  # fmt: skip
    layers = plans["drop"].acts["decoder layers"] - plans["no_drop"].acts["decoder layers"]
    h, i = arch.hidden, arch.intermediate
    # dropout copies + masks of the adapted inputs: q, k, v, gate, up read h; o reads q; down I.
    assert layers == 3 * (5 * h + arch.q_hidden + i) * arch.layers * 128 * 2
    assert plans["no_drop"].peak < plans["full"].peak


def test_targets_that_adapt_no_linear_are_a_user_error():
    with pytest.raises(UserError, match=r"lora.target_modules: \['qkv'\] adapts none"):
        with_lora(KNOWN_ARCHS["llama-7b"], LoraSection(enabled=True, target_modules=["qkv"]))
