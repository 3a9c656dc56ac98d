"""XTransplant pair search: time per (pair, example), source layers batched vs the naive loop.

`PairSearchWorker.run_unit` for one target layer and every source layer, XCOPA-style
log-likelihood scoring (two choices), SmolLM2-135M (30 layers). By default 10 source layers
spread over the stack (--sources 30 for all of them; the search's real unit) to keep the run
within a few minutes on 2 shared cores.
batched: one forward of B = sources x choices rows on a shared prefix KV cache;
naive: one forward per source layer (`batch_sources=False`, the reference the tests compare).
Aux outputs are recorded once before timing (both variants reuse the cache). The first,
untimed round of both variants is the warm-up and the check that they score identically.
"""

from __future__ import annotations

import sys

from bench import timing
from bench.common import bench_parser, parse_bench_args, real_model

ITEMS = [
    ("Der Mann brach sich den Zeh, weil", "The man broke his toe because",
     (" er einen Hammer auf den Fuß fallen ließ.", " er ein Loch in der Socke hatte."), 0),
    ("Ich leerte meine Taschen, deshalb", "I emptied my pockets, so",
     (" fand ich eine Eintrittskarte.", " bekam ich eine Waffe."), 0),
    ("Das Kind wurde krank, weil", "The child got sick because",
     (" es draußen regnete.", " es verdorbenes Essen gegessen hatte."), 1),
]  # fmt: skip


def main() -> None:
    parser = bench_parser(__doc__, reps=3, warmup=0, warmup_help="extra untimed rounds")
    parser.add_argument("--target", type=int, default=15, help="target layer j (1-based)")
    parser.add_argument("--sources", type=int, default=10, help="N source layers, evenly spread")
    args, threads = parse_bench_args(parser)

    from launcher.xtransplant_config import Instance
    from launcher.xtransplant_worker import PairSearchWorker, Unit

    model, tok = real_model()
    instances = [
        Instance(i, main, aux, float(gold), choices)
        for i, (main, aux, choices, gold) in enumerate(ITEMS)
    ]
    workers = {
        mode: PairSearchWorker(
            model, tok, task="xcopa", chat=False, batch_sources=mode == "batched"
        )
        for mode in ("batched", "naive")
    }
    n_layers = workers["batched"].num_layers
    n_src = max(1, min(args.sources, n_layers))
    sources = sorted({round(i * (n_layers - 1) / max(1, n_src - 1)) for i in range(n_src)})
    unit = Unit("de", "dev", args.target)
    print(
        timing.header("xtransplant_search: SmolLM2-135M, fp32, XCOPA-style log-likelihood", threads)
    )
    print(f"# target layer {args.target}, {len(sources)} source layers x {len(instances)} "
          f"examples x 2 choices; {args.reps} reps after {args.warmup + 1} warm-up, interleaved; "
          "batched == naive correctness checked")  # fmt: skip
    results = {}
    for mode, worker in workers.items():
        print(f"  [check] {mode} round (untimed)", file=sys.stderr, flush=True)
        worker.recorded(("de", "dev"), instances)  # recording is not what we time
        results[mode] = worker.run_unit(unit, instances, sources).correct
    assert results["batched"] == results["naive"], "batched and naive disagree"

    variants = {m: (lambda w=w: w.run_unit(unit, instances, sources)) for m, w in workers.items()}
    timings = timing.interleave(variants, args.reps, warmup=args.warmup)
    times = timings.times
    per = len(sources) * len(instances)
    per_pair = {k: [t / per for t in v] for k, v in times.items()}
    r = timing.ratios(times["batched"], times["naive"])
    for k in ("naive", "batched"):
        med, lo, hi = timing.median_spread(per_pair[k])
        print(f"{k:7s}: {med * 1e3:.2f} ms per (pair, example) [{lo * 1e3:.2f}-{hi * 1e3:.2f}]; "
              f"unit {timing.fmt_times(times[k])}")  # fmt: skip
    med = timing.median_spread(r)[0]
    print(f"batched / naive time: {timing.fmt_ratio(r)}")
    if w := timing.spread_warning(r, "batched/naive"):
        print(w)
    per_batched = timing.median_spread(per_pair["batched"])[0]
    per_naive = timing.median_spread(per_pair["naive"])[0]
    best = timing.best_ratio(times["batched"], times["naive"])
    print(f"SUMMARY xtransplant_search: {per_batched * 1e3:.2f} ms vs "
          f"{per_naive * 1e3:.2f} ms per (pair, example), batched/naive "
          f"{med:.3f} [{min(r):.3f}-{max(r):.3f}] ({1 / med:.1f}x faster; best-of "
          f"{best:.3f}) [{timings.load_note()}]")  # fmt: skip


if __name__ == "__main__":
    main()
