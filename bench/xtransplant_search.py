"""XTransplant pair search: time per (pair, example), source layers batched vs the naive loop.

`PairSearchWorker.run_unit` for one target layer and every source layer, XCOPA-style
log-likelihood scoring (two choices), SmolLM2-135M (30 layers, so 30 source layers per unit).
batched: one forward of 30 rows (one per source layer) on a shared prefix KV cache;
naive: one forward per source layer (`batch_sources=False`, the reference the tests compare).
Aux outputs are recorded once before timing (both variants reuse the cache).
"""

from __future__ import annotations

import argparse

import torch

from bench.timing import fmt_ratio, fmt_times, interleave, median_spread, ratios, set_threads

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
    parser.add_argument("--target", type=int, default=15)
    args = parser.parse_args()
    threads = set_threads()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from launcher.schema import ModelSection
    from model.backbone import resolve_backbone
    from model.xtransplant import Instance, PairSearchWorker, Unit

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
    sources = list(range(workers["batched"].num_layers))
    unit = Unit("de", "dev", args.target)
    results = {}
    for mode, worker in workers.items():
        worker.recorded(("de", "dev"), instances)  # recording is not what we time
        results[mode] = worker.run_unit(unit, instances, sources).correct
    assert results["batched"] == results["naive"], "batched and naive disagree"

    variants = {m: (lambda w=w: w.run_unit(unit, instances, sources)) for m, w in workers.items()}
    times = interleave(variants, args.reps, warmup=1)
    per = len(sources) * len(instances)
    per_pair = {k: [t / per for t in v] for k, v in times.items()}
    r = ratios(times["batched"], times["naive"])
    print(f"# SmolLM2-135M ({len(sources)} layers), CPU {threads} threads, fp32; target layer "
          f"{args.target}, {len(sources)} source layers x {len(instances)} XCOPA-style examples; "
          f"{args.reps} reps after 1 warm-up, interleaved; batched == naive results checked")  # fmt: skip
    for k in ("naive", "batched"):
        med, lo, hi = median_spread(per_pair[k])
        print(f"{k:7s}: {med * 1e3:.2f} ms per (pair, example) [{lo * 1e3:.2f}-{hi * 1e3:.2f}]; "
              f"unit {fmt_times(times[k])}")  # fmt: skip
    med = median_spread(r)[0]
    print(f"batched / naive time: {fmt_ratio(r)}")
    print(f"SUMMARY xtransplant_search: {median_spread(per_pair['batched'])[0] * 1e3:.2f} ms vs "
          f"{median_spread(per_pair['naive'])[0] * 1e3:.2f} ms per (pair, example), batched/naive "
          f"{med:.3f} [{min(r):.3f}-{max(r):.3f}] ({1 / med:.1f}x faster)")  # fmt: skip


if __name__ == "__main__":
    main()
