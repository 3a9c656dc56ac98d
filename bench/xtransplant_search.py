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

import argparse
import sys

import torch

from bench.timing import (
    best_ratio,
    fmt_ratio,
    fmt_times,
    header,
    interleave,
    median_spread,
    ratios,
    set_threads,
    spread_warning,
)

ITEMS = [
    ("Der Mann brach sich den Zeh, weil", "The man broke his toe because",
     (" er einen Hammer auf den Fuß fallen ließ.", " er ein Loch in der Socke hatte."), 0),
    ("Ich leerte meine Taschen, deshalb", "I emptied my pockets, so",
     (" fand ich eine Eintrittskarte.", " bekam ich eine Waffe."), 0),
    ("Das Kind wurde krank, weil", "The child got sick because",
     (" es draußen regnete.", " es verdorbenes Essen gegessen hatte."), 1),
]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=0, help="extra untimed rounds")
    parser.add_argument("--target", type=int, default=15, help="target layer j (1-based)")
    parser.add_argument("--sources", type=int, default=10, help="N source layers, evenly spread")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = set_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config.schema import ModelSection
    from launcher.xtransplant_config import Instance
    from launcher.xtransplant_worker import PairSearchWorker, Unit
    from model.backbone import resolve_backbone

    path = resolve_backbone(ModelSection()).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
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
    print(header("xtransplant_search: SmolLM2-135M, fp32, XCOPA-style log-likelihood", threads))
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
    timings = interleave(variants, args.reps, warmup=args.warmup)
    times = timings.times
    per = len(sources) * len(instances)
    per_pair = {k: [t / per for t in v] for k, v in times.items()}
    r = ratios(times["batched"], times["naive"])
    for k in ("naive", "batched"):
        med, lo, hi = median_spread(per_pair[k])
        print(f"{k:7s}: {med * 1e3:.2f} ms per (pair, example) [{lo * 1e3:.2f}-{hi * 1e3:.2f}]; "
              f"unit {fmt_times(times[k])}")  # fmt: skip
    med = median_spread(r)[0]
    print(f"batched / naive time: {fmt_ratio(r)}")
    if w := spread_warning(r, "batched/naive"):
        print(w)
    print(f"SUMMARY xtransplant_search: {median_spread(per_pair['batched'])[0] * 1e3:.2f} ms vs "
          f"{median_spread(per_pair['naive'])[0] * 1e3:.2f} ms per (pair, example), batched/naive "
          f"{med:.3f} [{min(r):.3f}-{max(r):.3f}] ({1 / med:.1f}x faster; best-of "
          f"{best_ratio(times['batched'], times['naive']):.3f}) [{timings.load_note()}]")  # fmt: skip


if __name__ == "__main__":
    main()
