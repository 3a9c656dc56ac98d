"""Language-vector (centroid) updates across ranks: collectives, bytes and time per update.

Two real torch.distributed gloo processes on 127.0.0.1 run ShifCon's `running`-mode update as
the method does it (per-step delta of sums and counts over layers f..b -> `shifcon_math.
all_reduce_` -> add). Every torch.distributed collective is wrapped by a counter while an
update runs: the target is exactly 1 per update. Bytes: K*layers*D*8 (float64 sums) +
K*layers*8 (float64 counts), one buffer. Correctness is checked too: after the updates both
ranks hold identical statistics, equal to the sum of both ranks' contributions.

Timing: a barrier (not counted) lines the ranks up before each update, so the time is the
collective's and not the other rank's lateness. The update (delta + all-reduce + add) is set
against a training step of the model size the shapes come from (rank 0 times a SmolLM2-135M
forward+backward+AdamW step, rank 1 waits), and projected to the 70B recipe (K=6, D=8192, band
[30, 38], ZeRO-3 over 64 GPUs) with stated network assumptions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from bench.timing import cores, header, load1, rel_spread

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "reduce_scatter", "all_gather_into_tensor",
               "reduce_scatter_tensor", "reduce", "all_to_all", "all_to_all_single", "gather",
               "scatter", "all_gather_object", "broadcast_object_list", "barrier")  # fmt: skip


def _hidden(args: argparse.Namespace, rank: int) -> dict[int, torch.Tensor]:
    """This rank's captured H_l for layers f..b (pair-batch shape), reproducible per rank."""
    gen = torch.Generator().manual_seed(rank)
    return {
        layer: torch.randn(args.rows, args.seq, args.d, generator=gen)
        for layer in range(args.f, args.b + 1)
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from methods.shifcon.math import LanguageStats, all_reduce_

    counts = {name: 0 for name in COLLECTIVES}
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    counting = [False]

    def wrap(name):
        real = originals[name]

        def wrapper(*a, **kw):
            if counting[0]:
                counts[name] += 1
            return real(*a, **kw)

        return wrapper

    for name in originals:
        setattr(dist, name, wrap(name))

    languages = [f"l{i}" for i in range(args.k)]
    layers = list(range(args.f, args.b + 1))
    stats = LanguageStats.zeros(languages, layers, args.d, device=torch.device("cpu"))
    mask = torch.ones(args.rows, args.seq, dtype=torch.long)
    mask[:, args.seq * 3 // 4 :] = torch.arange(args.rows).unsqueeze(1) % 2  # some padding
    lang_ids = torch.arange(args.rows) % args.k
    hidden = _hidden(args, rank)

    def update() -> tuple[float, float]:
        originals["barrier"]()  # line the ranks up (uncounted)
        counting[0] = True
        start = time.perf_counter()
        delta = stats.zeros_like()
        for layer in layers:
            delta.update(layer, hidden[layer], mask, lang_ids)
        mid = time.perf_counter()
        all_reduce_(delta)
        reduced = time.perf_counter()
        stats.add_(delta)
        end = time.perf_counter()
        counting[0] = False
        return reduced - mid, end - start

    update()  # warm-up
    for name in counts:
        counts[name] = 0
    times = [update() for _ in range(args.updates)]
    per_update = {k: v / args.updates for k, v in counts.items() if v}
    nbytes = stats.flat().numel() * stats.flat().element_size()
    for name, real in originals.items():
        setattr(dist, name, real)

    # Identical on both ranks, and equal to (updates + 1) x (rank-0 delta + rank-1 delta).
    flat = stats.flat()
    other = flat.clone()
    dist.broadcast(other, src=0)
    expected = LanguageStats.zeros(languages, layers, args.d, device=torch.device("cpu"))
    for r in range(world):
        for layer, h in _hidden(args, r).items():
            expected.update(layer, h, mask, lang_ids)
    exact = torch.allclose(flat, expected.flat() * (args.updates + 1), rtol=1e-9, atol=1e-6)
    same = torch.equal(flat, other)

    step_times: list[float] = []
    if rank == 0:
        step_times = _step_times(args.step_reps, args.step_batch, args.step_len)
    dist.barrier()
    if rank == 0:
        out.put((per_update, nbytes, times, step_times, exact and same))
    dist.destroy_process_group()


def _step_times(reps: int, batch: int, length: int) -> list[float]:
    """Forward+backward+AdamW step of SmolLM2-135M on batch x length tokens (first dropped)."""
    from bench.common import real_model

    torch.set_num_threads(min(2, cores()))
    model, _ = real_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (batch, length))
    out = []
    for i in range(reps + 1):
        start = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(time.perf_counter() - start)
        print(f"  [step {'warm-up' if i == 0 else f'{i}/{reps}'}] {out[-1]:.3f}s "
              f"(load {load1():.1f})", file=sys.stderr, flush=True)  # fmt: skip
    return out[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--k", type=int, default=6, help="languages (the demo's 6)")
    parser.add_argument("--f", type=int, default=11)
    parser.add_argument("--b", type=int, default=14)
    parser.add_argument("--d", type=int, default=576, help="hidden size (SmolLM2-135M)")
    parser.add_argument("--rows", type=int, default=8, help="pair-batch rows (2 x mcl_batch)")
    parser.add_argument("--seq", type=int, default=48, help="pair-batch length")
    parser.add_argument("--updates", type=int, default=50)
    parser.add_argument("--step-reps", type=int, default=3)
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-len", type=int, default=64)
    args = parser.parse_args()

    from parallel.distributed import free_port

    print(header("centroid_allreduce: 2 gloo processes on 127.0.0.1", torch.get_num_threads()))
    load_start = load1()
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(2, free_port(), args, queue), nprocs=2, join=True,
                       start_method="spawn")  # fmt: skip
    per_update, nbytes, times, step_times, correct = queue.get()
    load_end = load1()

    layers = args.b - args.f + 1
    expected = args.k * layers * args.d * 8 + args.k * layers * 8
    reduce_t = [t[0] for t in times]
    update_t = [t[1] for t in times]
    r_med, u_med = statistics.median(reduce_t), statistics.median(update_t)
    s_med = statistics.median(step_times)
    print(f"# K={args.k}, layers {args.f}..{args.b} ({layers}), D={args.d}, pair batch "
          f"{args.rows}x{args.seq}; {args.updates} updates after 1 warm-up")  # fmt: skip
    print(f"collectives per update: {per_update}")
    print(f"bytes per update: {nbytes} (formula K*layers*D*8 + K*layers*8 = {expected})")
    print(f"reduced statistics identical on both ranks and equal to the sum: {correct}")
    print(f"all-reduce per update: median {r_med * 1e3:.3f} ms [min {min(reduce_t) * 1e3:.3f}, "
          f"max {max(reduce_t) * 1e3:.3f}]")  # fmt: skip
    print(f"whole update (delta + all-reduce + add): median {u_med * 1e3:.3f} ms "
          f"[min {min(update_t) * 1e3:.3f}, max {max(update_t) * 1e3:.3f}]")  # fmt: skip
    print(f"training step (SmolLM2-135M, {args.step_batch}x{args.step_len} tokens, fwd+bwd+AdamW, "
          f"{min(2, cores())} threads): median {s_med:.3f} s "
          f"[{min(step_times):.3f}-{max(step_times):.3f}]")  # fmt: skip
    if rel_spread(step_times) > 0.25:
        print("WARNING: training-step spread > 25%: the machine was busy")

    # 70B projection (recipes/shifcon_70b.yaml: 6 languages, band [30, 38] = 9 layers, D 8192,
    # ZeRO-3 over 64 GPUs): ring all-reduce alpha-beta model, alpha = 10 us per hop, beta =
    # 25 GB/s per GPU (a 200 Gb/s NIC per GPU). Step: 6 * params * tokens of the 128 x 512
    # global batch at 40% of 989 TFLOP/s (H100 bf16 dense) on 64 GPUs, ShifCon's pair work left
    # out (it only lengthens the step, so the fraction below is an upper bound).
    k70, l70, d70, n70 = 6, 9, 8192, 64
    b70 = k70 * l70 * d70 * 8 + k70 * l70 * 8
    t70 = 2 * (n70 - 1) * 10e-6 + 2 * (n70 - 1) / n70 * b70 / 25e9
    s70 = 6 * 68.98e9 * 128 * 512 / (n70 * 0.4 * 989e12)
    print(f"70B projection: {b70 / 1e6:.2f} MB per update, ~{t70 * 1e3:.2f} ms (ring, 64 GPUs) vs "
          f"~{s70:.2f} s per step -> {t70 / s70:.1e} of a step")  # fmt: skip
    calls = sum(per_update.values())
    print(f"SUMMARY centroid_allreduce: {calls:g} collective(s)/update (target 1) "
          f"{'OK' if calls == 1 and correct else 'FAIL'}, {nbytes} B/update, all-reduce "
          f"{r_med * 1e3:.2f} ms (whole update {u_med * 1e3:.2f} ms) = {u_med / s_med:.1e} of a "
          f"{s_med:.2f} s SmolLM2 step; 70B projected {b70 / 1e6:.2f} MB, {t70 / s70:.1e} of a "
          f"step [load {min(load_start, load_end):.1f}-{max(load_start, load_end):.1f} on "
          f"{cores()} cores]")  # fmt: skip


if __name__ == "__main__":
    main()
