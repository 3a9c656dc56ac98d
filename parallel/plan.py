"""Per-GPU memory plan for a recipe: model states, activations, buffers, and a verdict.

``python -m parallel.plan RECIPE.yaml --gpus-per-node 8 --gpu-memory-gb 80 [--nodes N]
[--engine deepspeed|megatron] [--tp T --pp P] [--[no-]sequence-parallel]
[--[no-]distributed-optimizer] [--arch llama-70b]``

The layout comes from the recipe (parallel.engine, tensor_parallel, pipeline_parallel,
sequence_parallel, distributed_optimizer, zero_stage); each flag overrides its field.
``--engine deepspeed`` on a Megatron recipe plans the same run on ZeRO (TP = PP = 1).

Why: a 70B run that does not fit fails minutes into a multi-node allocation; this answers
"does it fit, and with which micro-batch" before anything is launched, from the recipe alone.

Assumptions (all per GPU, bytes):

- Model states, mixed-precision Adam: 16-bit params 2 + 16-bit grads 2 + fp32 master, m, v 12
  bytes/param. ZeRO-3 shards all three over the data-parallel group (world size; stage 2:
  grads and optimizer, stage 1: optimizer only, stage 0: nothing); ZeRO-3 also
  holds the gathered (full) 16-bit param and grad of the layer it works on: 4 x largest layer
  (the same term DeepSpeed's estimator uses). At the optimizer step DeepSpeed upcasts each
  optimizer sub-group's gradient to fp32: 4 x min(params/N, sub_group_size) (a transient that
  exists when activations are already freed; counted in the peak via max()).
  Megatron: states sharded over TP*PP; grads are the fp32 main-grad buffer (4 bytes: our engine
  sets grad_reduce_in_fp32, as Megatron does for bf16); with the distributed optimizer the 12
  bytes also over DP (Megatron's own table: 6 + 12/DP bytes/param for bf16 with fp32 grads).
  The embedding and LM head sit on the first/last stage; the even split ignores that (Llama-2:
  0.4% of the parameters).
- LoRA (recipe `lora:`, parallel/arch.py `LoraShape`): all weights stored in 16-bit as above,
  grads and the 12 optimizer bytes only for the adapters (r * (in + out) per adapted linear),
  ZeRO-3's gathered layer without a gradient; the adapters' activations are added per token.
- Activations of one Llama block per token (16-bit, flash/SDPA attention so no s^2 scores,
  no dropout), derived from what autograd saves (the method of Korthikanti et al. 2022, whose
  GPT figure is s*b*h*(34 + 5*a*s/h) with dropout masks, eager attention and a 4h GELU MLP):
  two RMSNorms (HF upcasts: fp32 input 4h + normalised 2h + output 2h each) 16h; q 2h, k and v
  2*2*h_kv (GQA), attention output 2h; SwiGLU gate 2I, silu(gate) 2I, up 2I, product 2I.
  Total 20h + 4h_kv + 8I bytes per token per layer (eager attention adds 4*a*s per token:
  scores and softmax in 16-bit). With activation checkpointing each layer keeps its 2h input
  and one layer is recomputed at a time. Megatron: the TP regions (q, k, v, attention output,
  the MLP's 8I) are divided by TP; the norms' 16h only with sequence parallelism (Korthikanti
  et al.); the 1F1B schedule keeps min(PP, micro-batches per step) micro-batches in flight on the
  first stage, each with L/PP layers.
- Logits: s*b*V*(2 + 4 + 4): 16-bit logits, their fp32 upcast for the loss, and its gradient.
- A method's own sequences (its registry entry's `plan_extras`; e.g. ShifCon's contrastive
  forward on 2*mcl_batch_size pair sequences of pairs.max_length tokens through layers 1..b-1)
  keep their activations for the backward.
- Buffers (ZeRO-3, from the generated DeepSpeed config or its defaults): the prefetch bucket
  (2 x stage3_prefetch_bucket_size) and the gradient reduce bucket (2 x reduce_bucket_size).
- Usable memory: gpu_memory * (1 - headroom) for the CUDA context, NCCL and fragmentation.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from config.cli import run_cli
from config.errors import UserError
from parallel.arch import KNOWN_ARCHS, Arch, arch_from_config, resolve_arch

if TYPE_CHECKING:
    from methods.base import ExtraActivations

__all__ = ["KNOWN_ARCHS", "Arch", "arch_from_config", "resolve_arch"]  # the planner's table

GB = 1e9


@dataclass
class Layout:
    engine: str  # deepspeed | megatron
    world: int
    tp: int = 1
    pp: int = 1
    distributed_optimizer: bool = True
    sequence_parallel: bool = True
    zero_stage: int = 3
    accum: int = 1 << 30  # micro-batches per optimizer step (bounds 1F1B's in-flight count)

    @property
    def dp(self) -> int:
        return self.world // (self.tp * self.pp)

    @property
    def in_flight(self) -> int:
        """Micro-batches whose activations the first pipeline stage holds at once (1F1B)."""
        return max(1, min(self.pp, self.accum))


def layout_from_recipe(
    parallel: Any,
    world: int,
    *,
    engine: str | None = None,
    tp: int | None = None,
    pp: int | None = None,
    sequence_parallel: bool | None = None,
    distributed_optimizer: bool | None = None,
) -> Layout:
    """The recipe's parallel section, each field overridable (None: keep the recipe's).

    Fields are read with getattr defaults (the schema's own), so a recipe schema without the
    Megatron fields plans as ZeRO-3. TP/PP of the recipe apply only to its own engine: planning
    a Megatron recipe with engine="deepspeed" gives TP = PP = 1 unless tp/pp are passed.
    """
    recipe_engine = getattr(parallel, "engine", "deepspeed")
    engine = engine or recipe_engine
    same = engine == recipe_engine
    tp = tp or (getattr(parallel, "tensor_parallel", 1) if same else 1)
    pp = pp or (getattr(parallel, "pipeline_parallel", 1) if same else 1)
    if world % (tp * pp):
        raise UserError(f"TP {tp} x PP {pp} does not divide {world} GPUs")
    if engine == "deepspeed" and tp * pp > 1:
        raise UserError("the deepspeed engine is data-parallel (ZeRO): use --engine megatron")
    sp = (
        getattr(parallel, "sequence_parallel", False)
        if sequence_parallel is None
        else sequence_parallel
    )
    dist_opt = (getattr(parallel, "distributed_optimizer", False)
                if distributed_optimizer is None else distributed_optimizer)  # fmt: skip
    return Layout(engine, world, tp, pp, bool(dist_opt), bool(sp) and tp > 1,
                  int(getattr(parallel, "zero_stage", 3)))  # fmt: skip


@dataclass
class Workload:
    seq: int
    micro_batch: int
    checkpointing: bool
    eager_attention: bool = False
    extra: ExtraActivations | None = None  # the method's own sequences per micro-batch


@dataclass
class ZeroBuffers:
    prefetch_bucket: int = int(5e7)
    reduce_bucket: int = int(5e8)
    sub_group: int = int(1e9)

    @classmethod
    def from_ds_config(cls, config: dict[str, Any]) -> ZeroBuffers:
        z = config.get("zero_optimization", {})
        return cls(
            int(z.get("stage3_prefetch_bucket_size", z.get("prefetch_bucket_size", 5e7))),
            int(z.get("reduce_bucket_size", 5e8)),
            int(z.get("sub_group_size", 1e9)),
        )


def model_states(arch: Arch, layout: Layout, zero: ZeroBuffers) -> dict[str, float]:
    """Per-GPU bytes of params, grads, optimizer states (+ ZeRO-3's gathered layer).

    With LoRA (``arch.lora``) every weight is still stored (16-bit, frozen base included), but
    grads and the fp32 master + Adam moments exist only for the adapters
    (``arch.trainable_params``), and the gathered layer has no gradient."""
    p, t = arch.total_params, arch.trainable_params
    if layout.engine == "deepspeed":
        n, stage = layout.world, layout.zero_stage

        def tag(k: int) -> tuple[str, int]:
            return ("/N", n) if stage >= k else ("replicated", 1)

        (pt, pn), (gt, gn), (ot, on) = tag(3), tag(2), tag(1)
        which = " of the adapters" if arch.lora else ""
        out = {
            f"params (16-bit, {pt})": 2 * p / pn,
            f"grads{which} (16-bit, {gt})": 2 * t / gn,
            f"optimizer{which} (fp32 master+m+v, {ot})": 12 * t / on,
        }
        if stage == 3 and arch.lora:
            out["gathered layer (16-bit param; frozen: no grad)"] = 2 * arch.largest_layer_params
        elif stage == 3:
            out["gathered layer (16-bit param+grad)"] = 4 * arch.largest_layer_params
        return out
    mp = layout.tp * layout.pp
    opt_shard = mp * (layout.dp if layout.distributed_optimizer else 1)
    opt_key = (
        "optimizer (fp32, /TP*PP*DP)"
        if layout.distributed_optimizer
        else "optimizer (fp32, /TP*PP)"
    )
    return {
        "params (16-bit, /TP*PP)": 2 * p / mp,
        "main grads (fp32, /TP*PP)": 4 * p / mp,
        opt_key: 12 * p / opt_shard,
    }


def step_transient(arch: Arch, layout: Layout, zero: ZeroBuffers) -> float:
    """fp32 gradient of one optimizer sub-group at the ZeRO-3 step (activations are gone)."""
    if layout.engine != "deepspeed" or layout.zero_stage == 0:
        return 0.0
    return 4 * min(arch.trainable_params / layout.world, zero.sub_group)


def activations(arch: Arch, layout: Layout, work: Workload, micro_batch: int) -> dict[str, float]:
    """Per-GPU activation bytes for `micro_batch` sequences (linear in micro_batch).

    Megatron as the engine runs it (parallel/megatron_model.py): megatron-core's local spec,
    whose DotProductAttention is unfused (scores materialised, softmax in fp32: 2 bytes per
    score more than the 16-bit eager figure), whatever the recipe's `attn_implementation`
    (a Hugging Face setting); logits split over TP for the vocab-parallel loss; a method's
    extra rows (ShifCon's pair rows) at their own width on both engines (megatron: a
    micro-batch of their own)."""
    megatron = layout.engine == "megatron"
    eager = work.eager_attention or megatron
    tp = layout.tp if megatron else 1
    sp = tp if (megatron and layout.sequence_parallel) else 1

    def token_bytes(seq: int) -> float:  # one layer, one token of a `seq`-long row, this GPU
        outside, inside = arch.activation_parts(eager, seq)
        if megatron:
            inside += 2.0 * arch.heads * seq  # the fp32 softmax output beside 16-bit scores
        return outside / sp + inside / tp

    per_tok = token_bytes(work.seq)
    kept = 2 * arch.hidden / sp  # a checkpointed layer's saved input
    # First pipeline stage: L/PP layers for each of `in_flight` micro-batches (1F1B).
    stage_layers = arch.layers / layout.pp if megatron else arch.layers
    in_flight = layout.in_flight if megatron else 1

    def stack(layers: float, tokens: int, copies: int, per_tok: float = per_tok) -> float:
        if work.checkpointing:  # saved inputs of every copy + one layer recomputed at a time
            return layers * kept * tokens * copies + per_tok * tokens
        return layers * per_tok * tokens * copies

    tokens = work.seq * micro_batch
    out = {"decoder layers": stack(stage_layers, tokens, in_flight)}
    out["logits (16-bit + fp32 + grad)"] = tokens * arch.vocab * 10 / tp
    extra = work.extra
    if extra is not None and extra.sequences:
        extra_tokens = extra.seq_len * extra.sequences  # one such batch per micro-batch
        depth = min(extra.depth, stage_layers)  # the layers they pass that live on this stage
        out[extra.label] = stack(depth, extra_tokens, in_flight, token_bytes(extra.seq_len))
    return out


def buffers(layout: Layout, zero: ZeroBuffers) -> dict[str, float]:
    if layout.engine != "deepspeed" or layout.zero_stage == 0:
        return {}
    out = {"ZeRO reduce bucket": 2 * zero.reduce_bucket}
    if layout.zero_stage == 3:
        out = {"ZeRO-3 prefetch bucket": 2 * zero.prefetch_bucket, **out}
    return out


@dataclass
class Plan:
    states: dict[str, float]
    acts: dict[str, float]
    bufs: dict[str, float]
    transient: float
    capacity: float

    @property
    def fixed(self) -> float:
        return sum(self.states.values()) + sum(self.bufs.values())

    @property
    def peak(self) -> float:
        return sum(self.states.values()) + max(
            sum(self.acts.values()) + sum(self.bufs.values()), self.transient
        )

    @property
    def fits(self) -> bool:
        return self.peak <= self.capacity


def make_plan(
    arch: Arch, layout: Layout, work: Workload, zero: ZeroBuffers, capacity: float
) -> Plan:
    return Plan(
        model_states(arch, layout, zero),
        activations(arch, layout, work, work.micro_batch),
        buffers(layout, zero),
        step_transient(arch, layout, zero),
        capacity,
    )


def largest_micro_batch(fixed: float, per_sample: float, step_peak: float, capacity: float) -> int:
    """Largest b with max(fixed + b * per_sample, step_peak) <= capacity; 0 when none fits.

    `fixed`: states + buffers + micro-batch-independent activations; `step_peak`: states plus
    the optimizer-step transient (activations are freed by then).
    """
    if step_peak > capacity or fixed + per_sample > capacity:
        return 0
    return int((capacity - fixed) // per_sample)


def plan_largest(arch: Arch, layout: Layout, work: Workload, zero: ZeroBuffers,
                 capacity: float) -> int:  # fmt: skip
    one = sum(activations(arch, layout, work, 1).values())
    per_sample = sum(activations(arch, layout, work, 2).values()) - one
    states = sum(model_states(arch, layout, zero).values())
    fixed = states + sum(buffers(layout, zero).values()) + one - per_sample
    return largest_micro_batch(fixed, per_sample, states + step_transient(arch, layout, zero),
                               capacity)  # fmt: skip


def deepspeed_estimate(arch: Arch, gpus_per_node: int, nodes: int) -> float:
    """DeepSpeed's own ZeRO-3 per-GPU model-state estimate (no offload), in bytes."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(
        arch.total_params,
        arch.largest_layer_params,
        num_gpus_per_node=gpus_per_node,
        num_nodes=nodes,
        cpu_offload=False,
        cpu_offload_params=False,
        zero_init=True,
    )
    return float(gpu)


def model_state_peak(plan: Plan) -> float:
    """What DeepSpeed's estimator estimates: states at their peak (the optimizer step)."""
    return sum(plan.states.values()) + plan.transient


def _engine_note(layout: Layout) -> str:
    if layout.engine == "deepspeed":
        return f"deepspeed ZeRO-{layout.zero_stage}"
    flags = [
        f"sequence parallel {'on' if layout.sequence_parallel else 'off'}",
        f"distributed optimizer {'on' if layout.distributed_optimizer else 'off'}",
    ]
    if layout.pp > 1:
        flags.append(f"1F1B: {layout.in_flight} micro-batches in flight on stage 1")
    return f"megatron ({', '.join(flags)})"


def _gb(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def render(recipe, arch: Arch, layout: Layout, work: Workload, zero: ZeroBuffers, plan: Plan,
           largest: int, ds_est: float | None) -> str:  # fmt: skip
    lines = [
        f"plan: {recipe.name}  ({arch.name}: {arch.total_params / 1e9:.2f}B params, "
        f"{arch.layers} layers, h={arch.hidden}, I={arch.intermediate}, heads={arch.heads}/"
        f"{arch.kv_heads} kv, vocab={arch.vocab})",
        f"layout: {_engine_note(layout)}, world {layout.world} = TP {layout.tp} x PP "
        f"{layout.pp} x DP {layout.dp}; seq {work.seq}, micro-batch {work.micro_batch}, "
        f"activation checkpointing {'on' if work.checkpointing else 'off'}",
        "model states (per GPU):",
        *(f"  {k:42s}{_gb(v)}" for k, v in plan.states.items()),
        f"activations (micro-batch {work.micro_batch}):",
        *(f"  {k:42s}{_gb(v)}" for k, v in plan.acts.items()),
    ]
    if plan.bufs:
        lines += ["buffers:", *(f"  {k:42s}{_gb(v)}" for k, v in plan.bufs.items())]
    if plan.transient:
        lines.append(f"  {'optimizer-step fp32 grad sub-group':42s}{_gb(plan.transient)}"
                     "  (after activations are freed)")  # fmt: skip
    other = replace(work, checkpointing=not work.checkpointing)
    other_acts = sum(activations(arch, layout, other, work.micro_batch).values())
    lines.append(
        f"  (activations with checkpointing {'off' if work.checkpointing else 'on'}: "
        f"{other_acts / GB:.2f} GB)"
    )
    if ds_est is not None:
        ours = model_state_peak(plan)
        lines.append(
            f"model-state peak (states + step transient) {ours / GB:.2f} GB; DeepSpeed's "
            f"estimator (no offload) {ds_est / GB:.2f} GB ({ours / ds_est - 1:+.1%})"
        )
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"peak {plan.peak / GB:.2f} GB of {plan.capacity / GB:.2f} GB usable -> {verdict}; "
        f"largest micro-batch that fits: {largest}"
    )
    return "\n".join(lines)


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m parallel.plan", description=__doc__.split("\n")[0]
    )
    parser.add_argument("recipe")
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--gpu-memory-gb", type=float, default=80.0)
    parser.add_argument("--nodes", type=int, default=None, help="default: cluster.nodes")
    parser.add_argument("--engine", choices=["deepspeed", "megatron"], default=None)
    parser.add_argument("--tp", type=int, default=None, help="default: parallel.tensor_parallel")
    parser.add_argument("--pp", type=int, default=None, help="default: parallel.pipeline_parallel")
    parser.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction,
                        default=None, help="default: parallel.sequence_parallel")  # fmt: skip
    parser.add_argument("--distributed-optimizer", action=argparse.BooleanOptionalAction,
                        default=None, help="default: parallel.distributed_optimizer")  # fmt: skip
    parser.add_argument("--arch", default=None, help=f"one of {sorted(KNOWN_ARCHS)}")
    parser.add_argument("--micro-batch", type=int, default=None)
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction kept free")
    args = parser.parse_args(argv)
    print(plan_text(args))  # a UserError (bad recipe, layout, arch) is run_cli's to report
    return 0


def plan_text(args: argparse.Namespace) -> str:
    """The rendered plan for the parsed command line; UserError for what the user must fix."""
    from config.recipe import load_recipe
    from methods.registry import plan_extras, recipe_errors
    from parallel.ds_config import build_deepspeed_config

    recipe = load_recipe(args.recipe)
    errors = recipe_errors(recipe)
    if errors:
        raise UserError(errors[0])
    arch = resolve_arch(recipe, args.arch)
    nodes = args.nodes or recipe.cluster.nodes
    world = nodes * args.gpus_per_node
    layout = layout_from_recipe(
        recipe.parallel,
        world,
        engine=args.engine,
        tp=args.tp,
        pp=args.pp,
        sequence_parallel=args.sequence_parallel,
        distributed_optimizer=args.distributed_optimizer,
    )
    t = recipe.training
    micro = args.micro_batch or t.micro_batch_size
    layout.accum = max(1, t.global_batch_size // (micro * layout.dp))
    work = Workload(
        seq=recipe.data.max_length,
        micro_batch=micro,
        checkpointing=recipe.model.gradient_checkpointing,
        eager_attention=recipe.model.attn_implementation == "eager",
        extra=plan_extras(recipe.method, arch.layers),
    )
    zero = ZeroBuffers.from_ds_config(build_deepspeed_config(recipe, "cuda"))
    capacity = args.gpu_memory_gb * GB * (1 - args.headroom)
    plan = make_plan(arch, layout, work, zero, capacity)
    largest = plan_largest(arch, layout, work, zero, capacity)
    ds_est = (
        deepspeed_estimate(arch, args.gpus_per_node, nodes)
        if layout.engine == "deepspeed" and layout.zero_stage == 3
        else None
    )
    return render(recipe, arch, layout, work, zero, plan, largest, ds_est)


if __name__ == "__main__":
    sys.exit(main())
