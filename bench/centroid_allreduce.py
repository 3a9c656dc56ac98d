"""Language-vector (centroid) updates across ranks: collectives, bytes and time per update.

Two gloo processes on 127.0.0.1 run ShifCon's `running`-mode update as the method does it
(per-step delta of sums and counts -> `shifcon_math.all_reduce_` -> add). A counting wrapper
around the real `torch.distributed.all_reduce` (and every other collective) counts calls per
update: the target is exactly 1. Bytes: K*layers*D*8 (float64 sums) + K*layers*8 (counts).
The update time is set against a training step of the same model size (rank 0 times a
SmolLM2-135M forward+backward+AdamW step on 4 x 64 tokens, rank 1 waits), and projected to a
70B run (K=8, D=8192, band [30, 38]) with stated network assumptions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce")  # fmt: skip


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from model.shifcon_math import LanguageStats, all_reduce_

    counts = {name: 0 for name in COLLECTIVES}
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name):
        real = originals[name]

        def wrapper(*a, **kw):
            counts[name] += 1
            return real(*a, **kw)

        return wrapper

    for name in originals:
        setattr(dist, name, counting(name))

    languages = [f"l{i}" for i in range(args.k)]
    layers = list(range(args.f, args.b + 1))
    stats = LanguageStats.zeros(languages, layers, args.d, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(rank)
    batch, seq = 8, 48
    hidden = {layer: torch.randn(batch, seq, args.d, generator=gen) for layer in layers}
    mask = torch.ones(batch, seq, dtype=torch.long)
    lang_ids = torch.arange(batch) % args.k

    def update() -> float:
        delta = stats.zeros_like()
        for layer in layers:
            delta.update(layer, hidden[layer], mask, lang_ids)
        start = time.perf_counter()
        all_reduce_(delta)
        elapsed = time.perf_counter() - start
        stats.add_(delta)
        return elapsed

    update()  # warm-up
    for name in counts:
        counts[name] = 0
    times = [update() for _ in range(args.updates)]
    per_update = {k: v / args.updates for k, v in counts.items() if v}
    nbytes = stats.flat().numel() * stats.flat().element_size()
    for name, real in originals.items():
        setattr(dist, name, real)

    step_times: list[float] = []
    if rank == 0:
        step_times = _step_times(args.step_reps)
    dist.barrier()
    if rank == 0:
        out.put((per_update, nbytes, times, step_times))
    dist.destroy_process_group()


def _step_times(reps: int) -> list[float]:
    """Forward+backward+AdamW step of SmolLM2-135M on 4 x 64 tokens (first one dropped)."""
    from transformers import AutoModelForCausalLM

    from launcher.schema import ModelSection
    from model.backbone import resolve_backbone

    torch.set_num_threads(2)
    path = resolve_backbone(ModelSection()).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    out = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(time.perf_counter() - start)
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=6)
    parser.add_argument("--f", type=int, default=11)
    parser.add_argument("--b", type=int, default=14)
    parser.add_argument("--d", type=int, default=576)
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--step-reps", type=int, default=3)
    args = parser.parse_args()

    from parallel.distributed import free_port

    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), args, queue), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    per_update, nbytes, times, step_times = queue.get()

    layers = args.b - args.f + 1
    expected = args.k * layers * args.d * 8 + args.k * layers * 8
    t_med = statistics.median(times)
    s_med = statistics.median(step_times)
    print(f"# 2 gloo processes on 127.0.0.1; K={args.k}, layers {args.f}..{args.b} ({layers}), "
          f"D={args.d}; {args.updates} updates after 1 warm-up")  # fmt: skip
    print(f"collectives per update: {per_update}")
    print(f"bytes per update: {nbytes} (formula K*layers*D*8 + K*layers*8 = {expected})")
    print(f"all-reduce time per update: median {t_med * 1e3:.3f} ms "
          f"[min {min(times) * 1e3:.3f}, max {max(times) * 1e3:.3f}]")  # fmt: skip
    print(f"training step (SmolLM2-135M, 4x64 tokens, fwd+bwd+AdamW, 2 threads): median "
          f"{s_med:.3f} s [{min(step_times):.3f}-{max(step_times):.3f}]")  # fmt: skip
    frac = t_med / s_med

    # 70B projection: K=8, band [30, 38] (9 layers), D=8192, 64 GPUs; ring all-reduce
    # alpha-beta model, alpha = 10 us per hop, beta = 25 GB/s per GPU (200 Gb/s NIC per GPU).
    k70, l70, d70, n70 = 8, 9, 8192, 64
    b70 = k70 * l70 * d70 * 8 + k70 * l70 * 8
    t70 = 2 * (n70 - 1) * 10e-6 + 2 * (n70 - 1) / n70 * b70 / 25e9
    # step: 6 * params * tokens (+ ShifCon's pair work ~ 3*(b-1)/L of the pair tokens, ignored
    # here: it only lengthens the step) at 40% of 989 TFLOP/s bf16 on 64 GPUs, 128 x 512 tokens.
    s70 = 6 * 68.98e9 * 128 * 512 / (64 * 0.4 * 989e12)
    print(f"70B projection: {b70 / 1e6:.2f} MB per update, ~{t70 * 1e3:.2f} ms (ring, 64 GPUs) vs "
          f"~{s70:.2f} s per step -> {t70 / s70:.1e} of a step")  # fmt: skip
    calls = sum(per_update.values())
    print(f"SUMMARY centroid_allreduce: {calls:g} collective(s)/update (target 1), {nbytes} B/update, "
          f"{t_med * 1e3:.2f} ms = {frac:.1e} of a {s_med:.2f} s SmolLM2 step; 70B projected "
          f"{b70 / 1e6:.2f} MB, {t70 / s70:.1e} of a step")  # fmt: skip


if __name__ == "__main__":
    main()
