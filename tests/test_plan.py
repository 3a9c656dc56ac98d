"""The memory planner: DeepSpeed's own estimator agrees, and the verdict arithmetic is right."""

from __future__ import annotations

import pytest

from parallel.plan import (
    KNOWN_ARCHS,
    Arch,
    Layout,
    Workload,
    ZeroBuffers,
    deepspeed_estimate,
    largest_micro_batch,
    make_plan,
    model_state_peak,
    plan_largest,
)


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
