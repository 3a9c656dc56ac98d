"""The memory planner: DeepSpeed's own estimator agrees, the verdict arithmetic is right, and the
layout (engine, TP, PP, sequence parallelism, distributed optimizer) comes from the recipe."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from config.errors import UserError
from methods.base import ExtraActivations
from parallel.plan import (
    KNOWN_ARCHS,
    Arch,
    Layout,
    Workload,
    ZeroBuffers,
    activations,
    deepspeed_estimate,
    largest_micro_batch,
    layout_from_recipe,
    make_plan,
    model_state_peak,
    model_states,
    plan_largest,
)
from parallel.plan import main as plan_main


@pytest.mark.parametrize(
    ("arch", "gpus", "nodes"), [("llama-7b", 8, 1), ("llama-70b", 8, 8), ("llama-70b", 8, 4)]
)
def test_model_states_match_deepspeed_estimator(arch: str, gpus: int, nodes: int) -> None:
    a = KNOWN_ARCHS[arch]
    layout = Layout("deepspeed", gpus * nodes)
    zero = ZeroBuffers(sub_group=int(1e8))  # what recipes/shifcon_{7b,70b}.yaml set
    work = Workload(seq=512, micro_batch=1, checkpointing=True)
    ours = model_state_peak(make_plan(a, layout, work, zero, 80e9))
    theirs = deepspeed_estimate(a, gpus, nodes)
    assert abs(ours / theirs - 1) < 0.10, (ours / 1e9, theirs / 1e9)


def test_param_counts_of_known_shapes() -> None:
    assert abs(KNOWN_ARCHS["llama-7b"].total_params / 6.738e9 - 1) < 0.005
    assert abs(KNOWN_ARCHS["llama-70b"].total_params / 68.977e9 - 1) < 0.005
    tiny = Arch("tiny", layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, vocab=10)
    # q,o 2*16 + k,v 2*4*2 + mlp 3*4*8 + 2 norms 8 = 152 per layer; 2 layers + embed/head + norm
    assert tiny.layer_params == 152
    assert tiny.total_params == 2 * 152 + 2 * 40 + 4


def test_largest_micro_batch_hand_case() -> None:
    # fixed 10, 3 per sample, capacity 20: 10 + 3b <= 20 -> b = 3
    assert largest_micro_batch(10.0, 3.0, 12.0, 20.0) == 3
    assert largest_micro_batch(10.0, 3.0, 21.0, 20.0) == 0  # the optimizer step alone overflows
    assert largest_micro_batch(18.0, 3.0, 12.0, 20.0) == 0  # not even one sample


def test_verdict_on_hand_computed_plan() -> None:
    # tiny model, ZeRO-3 on 2 GPUs, no ShifCon, checkpointing off, seq 4:
    a = Arch("tiny", layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, vocab=10)
    layout = Layout("deepspeed", 2)
    zero = ZeroBuffers(prefetch_bucket=0, reduce_bucket=0, sub_group=10**9)
    work = Workload(seq=4, micro_batch=1, checkpointing=False)
    p = a.total_params  # 388
    states = 16 * p / 2 + 4 * a.largest_layer_params  # 3104 + 160
    per_tok = 20 * 4 + 4 * 2 + 8 * 8  # 152 bytes per token per layer
    per_sample = 2 * per_tok * 4 + 4 * 10 * 10  # layers + logits (10 B per logit)
    assert per_sample == 1616
    capacity = states + 3 * per_sample + 1  # room for exactly 3 samples
    assert plan_largest(a, layout, work, zero, capacity) == 3
    assert make_plan(a, layout, work, zero, capacity).fits
    big = Workload(seq=4, micro_batch=4, checkpointing=False)
    assert not make_plan(a, layout, big, zero, capacity).fits


def test_layout_read_from_recipe_fields_and_overrides() -> None:
    old = SimpleNamespace(engine="deepspeed", zero_stage=3)  # a schema without Megatron fields
    assert layout_from_recipe(old, 8) == Layout("deepspeed", 8, 1, 1, False, False, 3)
    mg = SimpleNamespace(engine="megatron", tensor_parallel=8, pipeline_parallel=4,
                         sequence_parallel=True, distributed_optimizer=True)  # fmt: skip
    got = layout_from_recipe(mg, 64)
    assert (got.engine, got.tp, got.pp, got.dp) == ("megatron", 8, 4, 2)
    assert got.sequence_parallel and got.distributed_optimizer
    assert layout_from_recipe(mg, 64, pp=8).pp == 8
    assert not layout_from_recipe(mg, 64, sequence_parallel=False).sequence_parallel
    ds = layout_from_recipe(mg, 64, engine="deepspeed")  # the same run planned on ZeRO
    assert (ds.engine, ds.tp, ds.pp, ds.dp) == ("deepspeed", 1, 1, 64)
    with pytest.raises(UserError):
        layout_from_recipe(mg, 64, engine="deepspeed", tp=2)
    with pytest.raises(UserError):
        layout_from_recipe(mg, 12)  # TP 8 x PP 4 does not divide 12


def test_megatron_states_and_activation_split() -> None:
    a = Arch("tiny", layers=4, hidden=8, intermediate=16, heads=2, kv_heads=1, vocab=10)
    p = a.total_params
    lay = Layout("megatron", 8, tp=2, pp=2, distributed_optimizer=True, sequence_parallel=False)
    states = sum(model_states(a, lay, ZeroBuffers()).values())
    assert states == pytest.approx((6 + 12 / 2) * p / 4)  # Megatron's 6 + 12/DP, over TP*PP
    work = Workload(seq=4, micro_batch=1, checkpointing=False)
    lay.accum = 1  # one micro-batch per step: nothing else in flight on stage 1
    # megatron-core's local attention is unfused: seq^2 scores, softmax in fp32 (+2 bytes each)
    outside, inside = a.activation_parts(eager_attention=True, seq=4)
    inside += 2 * a.heads * 4
    layers = sum(activations(a, lay, work, 1).values()) - 4 * 10 * 10 / 2  # minus logits
    assert layers == pytest.approx(2 * (outside + inside / 2) * 4)  # L/PP=2 layers, 4 tokens
    lay.sequence_parallel = True
    sp_layers = activations(a, lay, work, 1)["decoder layers"]
    assert sp_layers == pytest.approx(2 * (outside + inside) / 2 * 4)
    # A method's extra rows are at their own width on both engines (megatron: own micro-batch).
    extra = ExtraActivations("pairs", sequences=2, seq_len=2, depth=1)
    wide = Workload(seq=4, micro_batch=1, checkpointing=False, extra=extra)
    pair_out, pair_in = a.activation_parts(eager_attention=True, seq=2)
    pair_in += 2 * a.heads * 2
    assert activations(a, lay, wide, 1)["pairs"] == pytest.approx((pair_out + pair_in) / 2 * 2 * 2)
    ds = Layout("deepspeed", 8)
    ds_parts = a.activation_parts(eager_attention=False, seq=4)
    assert activations(a, ds, wide, 1)["pairs"] == pytest.approx(sum(ds_parts) * 2 * 2)


@pytest.mark.parametrize("recipe", ["recipes/shifcon_7b.yaml", "recipes/shifcon_70b.yaml"])
@pytest.mark.parametrize("engine", [None, "deepspeed", "megatron"])
def test_plan_command_on_the_big_recipes(recipe: str, engine: str | None, capsys) -> None:
    from config.recipe import load_recipe

    par = load_recipe(recipe).parallel
    argv = [recipe, "--gpus-per-node", "8", "--gpu-memory-gb", "80"]
    if engine:
        argv += ["--engine", engine]
    if engine == "megatron" and par.engine != "megatron":
        argv += ["--tp", "8"]
    assert plan_main(argv) == 0
    out = capsys.readouterr().out
    want = engine or par.engine
    layout = next(line for line in out.splitlines() if line.startswith("layout: "))
    assert layout.startswith(f"layout: {want}")
    if want == par.engine:  # the recipe's own layout, read from its fields
        tp = getattr(par, "tensor_parallel", 1)
        pp = getattr(par, "pipeline_parallel", 1)
        assert f"TP {tp} x PP {pp}" in layout
    if want == "deepspeed":
        assert "TP 1 x PP 1" in layout and "DeepSpeed's estimator" in out
    assert "FITS" in out and "largest micro-batch that fits" in out


def test_plan_command_answers_bad_input_with_a_message_and_exit_2(capsys) -> None:
    """The library raises UserError; only the CLI turns it into `error: ...` and exit 2."""
    recipe = "recipes/shifcon_7b.yaml"
    assert plan_main([recipe, "--arch", "llama-1t"]) == 2
    assert capsys.readouterr().err.startswith("error: --arch: unknown 'llama-1t'; known: [")
    assert plan_main([recipe, "--engine", "deepspeed", "--tp", "2"]) == 2
    assert "use --engine megatron" in capsys.readouterr().err
