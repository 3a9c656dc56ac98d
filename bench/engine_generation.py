"""MGSM generation tokens/s on the training engine (KV cache) vs the export (HF generate).

One model, two paths, shift on in both: SmolLM2-135M-Instruct as a ShifCon DeepSpeed ZeRO-3
session (one process, band [11, 14], vectors precomputed as in training), and the same
weights exported (safetensors + vectors) and loaded with ``ShiftedLM``. The prompts are the
first Swahili MGSM questions of the shared data (chat-formatted, one batch, left-padded).
Variants, interleaved:
  engine  ``EngineScorer.generate_ids`` through ``Engine.prefill``/``decode`` (the path the
          recipe's ``eval:`` section runs after training)
  export  ``ShiftedLM.generate_ids`` (transformers ``generate`` with its KV cache)
Both decode exactly --new-tokens per row (no stop ids), and must give the same ids.
``--uncached`` also times the old engine path once (a full forward per new token).
Target: tokens/s(engine) / tokens/s(export) >= 1/1.5 = 0.667.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

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

TARGET = 1 / 1.5


def mgsm_questions(data_dir: Path, lang: str, n: int) -> list[str]:
    path = data_dir / "mgsm" / f"{lang}.jsonl"
    if not path.is_file():
        raise SystemExit(f"no MGSM file {path} (set --data-dir or POLYSHIFT_SHARED_DATA)")
    with path.open() as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [r["question"] for r in rows[:n]]


def load_outside_zero3(engine, load):
    """Load the export as a plain model: while the ZeRO-3 engine's HF DeepSpeed config is
    registered, transformers would build it partitioned (inside zero.Init)."""
    from transformers.integrations import deepspeed as hf_ds

    kept = getattr(engine, "_hf_ds_config", None)
    hf_ds.unset_hf_deepspeed_config()
    try:
        return load()
    finally:
        if kept is not None:
            hf_ds.set_hf_deepspeed_config(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--lang", default="sw")
    parser.add_argument(
        "--data-dir", default=os.environ.get("POLYSHIFT_SHARED_DATA", "../shared/data")
    )
    parser.add_argument(
        "--uncached", action="store_true", help="also time the old engine path once"
    )
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = set_threads(args.threads)
    questions = mgsm_questions(Path(args.data_dir), args.lang, args.questions)

    from bench.common import open_bench_session
    from data.formatting import chat_prompt_ids, left_pad
    from eval.engine import EngineScorer
    from launcher.loop import export_model
    from methods.shifcon.infer import ShiftedLM

    session = open_bench_session()
    engine, tok, languages = session.engine, session.tokenizer, session.data.languages
    if args.lang not in languages:
        raise SystemExit(f"--lang {args.lang}: the bench session has {languages}")
    export = Path(tempfile.mkdtemp(prefix="polyshift-bench-export-")) / "export"
    export_model(engine, tok, session.recipe, languages, export, engine.ctx)
    lm = load_outside_zero3(engine, lambda: ShiftedLM.from_export(export))
    prompts = [chat_prompt_ids(tok, q, None) for q in questions]
    ids, mask = left_pad(prompts, tok.pad_token_id)
    n_new = args.new_tokens * len(prompts)

    def scorer(kv_cache: bool) -> EngineScorer:
        es = EngineScorer(engine, tok, languages, batch_size=len(prompts), stop_ids=set(),
                          max_length=4096, kv_cache=kv_cache)  # fmt: skip
        return es

    outputs: dict[str, list[list[int]]] = {}

    def run_engine(kv_cache: bool = True) -> None:
        es = scorer(kv_cache)
        with es.language(args.lang):
            outputs["engine" if kv_cache else "uncached"] = es.generate_ids(
                prompts, args.new_tokens
            )

    def run_export() -> None:
        n = args.new_tokens
        out = lm.generate_ids(
            ids, mask, [args.lang] * len(prompts), max_new_tokens=n, min_new_tokens=n
        )
        outputs["export"] = out[:, ids.shape[1] :].tolist()

    print(header("engine_generation: SmolLM2-135M, fp32, greedy, shift on", threads))
    print(f"# {len(prompts)} {args.lang} MGSM questions ({ids.shape[1]} tokens, left-padded), "
          f"{args.new_tokens} new tokens each, band {tuple(session.recipe.method.band)}, "
          f"engine {session.recipe.parallel.engine} ZeRO-{session.recipe.parallel.zero_stage}; "
          f"{args.reps} reps after {args.warmup} warm-up, interleaved")  # fmt: skip
    timings = interleave(
        {"engine": run_engine, "export": run_export}, args.reps, warmup=args.warmup
    )
    same = outputs["engine"] == outputs["export"]
    tps = {k: [n_new / t for t in v] for k, v in timings.times.items()}
    for k in ("engine", "export"):
        med, lo, hi = median_spread(tps[k])
        print(f"{k:7s}: {med:.1f} tok/s [{lo:.1f}-{hi:.1f}]; time {fmt_times(timings[k])}")
    r = ratios(tps["engine"], tps["export"])
    med = median_spread(r)[0]
    best = best_ratio(timings["export"], timings["engine"])
    print(f"engine / export tokens/s: {fmt_ratio(r)}; best-of-{args.reps} {best:.3f}; "
          f"same ids on both paths: {same}")  # fmt: skip
    if w := spread_warning(r, "engine/export"):
        print(w)
    uncached = ""
    if args.uncached:
        timed = interleave({"uncached": lambda: run_engine(False)}, 1, warmup=0)
        u_tps = n_new / timed["uncached"][0]
        uncached = f"; old uncached engine path {u_tps:.1f} tok/s"
        print(f"uncached engine path: {u_tps:.1f} tok/s ({timed['uncached'][0]:.1f}s), same ids: "
              f"{outputs['uncached'] == outputs['export']}")  # fmt: skip
    verdict = "OK" if med >= TARGET and same else "UNDER" if same else "MISMATCH"
    print(f"SUMMARY engine_generation: tokens/s engine/export {med:.3f} [{min(r):.3f}-{max(r):.3f}] "
          f"(target >= {TARGET:.3f}, i.e. within 1.5x) {verdict}; engine "
          f"{median_spread(tps['engine'])[0]:.1f} vs export {median_spread(tps['export'])[0]:.1f} "
          f"tok/s; best-of {best:.3f}{uncached} [{timings.load_note()}]")  # fmt: skip


if __name__ == "__main__":
    with torch.no_grad():
        main()
