"""Shared set-up for the training benchmarks: a small-but-real session through our engine.

Config: the embedded SmolLM2-135M-Instruct (30 layers, h=576, GQA 9/3, vocab 49152) with short
sequences. Why: it is the project's real backbone (real tokenizer, tied embeddings, a vocab
large enough that the LM head matters as it does at 7B), loads offline in seconds. One
ZeRO-3 step on this 2-core CPU takes about 7-10 s at 4 x 64 tokens (of which ~2-3 s is the
fp32 AdamW step over 135M parameters), so a bench of ~20 steps stays within a few minutes.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
from pathlib import Path
from typing import Any

BASE: dict[str, Any] = {
    "name": "bench",
    "output_dir": "runs",
    "model": {"backbone": "embedded:smollm2-135m-instruct"},
    "data": {
        "train": [{"path": "builtin:polyglot?items=48&seed=0"}],
        "languages": ["en", "fr", "de", "es", "zh", "sw"],
        "dominant_language": "en",
        "max_length": 64,
        "eval_fraction": 0.1,
        "eval_samples_per_language": 2,
    },
    "method": {
        "name": "shifcon",
        "band": [11, 14],
        "vector_samples": 2,
        "mcl_batch_size": 4,
        "pairs": {"path": "train", "max_length": 48},
    },
    "training": {"steps": 1, "global_batch_size": 4, "micro_batch_size": 4, "eval_batch_size": 4},
    "parallel": {"engine": "deepspeed", "zero_stage": 3, "precision": "fp32"},
    "cluster": {"nodes": 1, "workers_per_node": 1, "device": "cpu"},
    "tracking": {"enabled": False},
    "checkpoint": {"resume": False, "export": False},
}


def single_process_env() -> None:
    """One-rank gloo group on loopback, DeepSpeed on its CPU accelerator."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def open_bench_session(overrides: dict[str, Any] | None = None):
    """`open_session` on the validated bench recipe (vectors precomputed, no checkpoint)."""
    single_process_env()
    from config.recipe import validate_recipe
    from launcher.loop import open_session

    tree = copy.deepcopy(BASE)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict) and isinstance(tree.get(section), dict):
            tree[section].update(values)
        else:
            tree[section] = values
    recipe = validate_recipe(tree, "bench")
    run_dir = Path(tempfile.mkdtemp(prefix="polyshift-bench-"))
    return open_session(recipe, run_dir)


def same_length_batch(session, size: int) -> list[int]:
    """Indices of `size` training examples of the longest kind (fixed shape every repetition)."""
    lengths = [len(e) for e in session.data.train]
    return sorted(range(len(lengths)), key=lambda i: -lengths[i])[:size]


def bench_parser(
    doc: str, *, reps: int, warmup: int = 1, warmup_help: str | None = None
) -> argparse.ArgumentParser:
    """The options every timed bench takes: repetitions, untimed warm-up rounds, threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--reps", type=int, default=reps)
    parser.add_argument("--warmup", type=int, default=warmup, help=warmup_help)
    parser.add_argument("--threads", type=int, default=None)
    return parser


def parse_bench_args(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, int]:
    """Parsed arguments and the torch thread count set from ``--threads``."""
    from bench.timing import set_threads

    args = parser.parse_args()
    return args, set_threads(args.threads)


def real_model() -> tuple[Any, Any]:
    """The embedded SmolLM2-135M-Instruct in fp32 (eval mode) and its tokenizer, padded by EOS
    where it has no pad token: the real backbone every model-level bench measures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from config.schema import ModelSection
    from model.backbone import resolve_backbone

    path = resolve_backbone(ModelSection()).path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
