"""Cached greedy generation on a training engine, recorded for the tests to compare.

``python -m tests.engine_generation RUN_DIR OUT.pt`` re-opens a run's session (DeepSpeed, one
process) in a fresh interpreter; `tests/megatron_worker.py` calls `record` inside its gloo pair.
Every rank must call `record` (prefill and decode are collectives); rank 0's dict is saved.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from data.formatting import IGNORE_INDEX, Batch, chat_prompt_ids
from eval.engine import EngineScorer
from eval.scorer import left_pad, right_pad

# Different lengths, so left padding and per-row positions are exercised.
PROMPTS = {
    "en": "Hello, how are you today?",
    "fr": "Bonjour, combien font deux et trois ?",
    "sw": "Habari yako? Jina lako ni nani, rafiki yangu mpendwa?",
}
STEPS = 6


def _cached(engine: Any, ids: torch.Tensor, mask: torch.Tensor, langs: torch.Tensor):
    """Greedy ids ``[B, STEPS]`` and each step's next-token logits ``[STEPS, B, V]``."""
    batch = Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX), langs)
    logits, state = engine.prefill(batch, STEPS)
    tokens, steps = [], []
    for step in range(STEPS):
        steps.append(logits.cpu())
        tokens.append(logits.argmax(dim=-1))
        if step + 1 < STEPS:
            logits = engine.decode(state, tokens[-1])
    return torch.stack(tokens, dim=1).cpu(), torch.stack(steps)


def record(session: Any) -> dict[str, Any]:
    """Rows of every run language in one batch (each its own shift), decoded with the cache,
    against full uncached forwards of the same sequences; and EngineScorer both ways."""
    engine, tok, languages = session.engine, session.tokenizer, session.data.languages
    langs = [lang for lang in PROMPTS if lang in languages]
    prompts = [chat_prompt_ids(tok, PROMPTS[lang], None) for lang in langs]
    lang_ids = torch.tensor([languages.index(lang) for lang in langs])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    tokens, cached_logits = _cached(engine, ids, mask, lang_ids)
    # Uncached reference: one full forward over prompt + generated ids (right-padded), read at
    # the positions that predicted each generated token.
    full = [p + t for p, t in zip(prompts, tokens.tolist(), strict=True)]
    rids, rmask = right_pad(full, tok.pad_token_id)
    logits = engine.forward_logits(
        Batch(rids, rmask, torch.full_like(rids, IGNORE_INDEX), lang_ids)
    )
    rows = torch.arange(len(full))
    uncached = torch.stack(
        [logits[rows, torch.tensor([len(p) - 1 + k for p in prompts])].cpu() for k in range(STEPS)]
    )
    plain_tokens, plain_logits = _cached(engine, ids, mask, torch.zeros_like(lang_ids))
    scorer: dict[str, Any] = {}
    texts = list(PROMPTS.values())
    for kv_cache in (True, False):
        es = EngineScorer(engine, tok, languages, batch_size=2, kv_cache=kv_cache, max_length=512,
                          stop_ids={tok.eos_token_id})  # fmt: skip
        got = {}
        for lang in langs:
            with es.language(lang):
                got[lang] = es.generate_ids([es.prompt_ids(t) for t in texts], STEPS)
        scorer["cached" if kv_cache else "uncached"] = got
        scorer["forwards_" + ("cached" if kv_cache else "uncached")] = es.forwards
    return {
        "langs": langs,
        "prompts": [PROMPTS[lang] for lang in langs],
        "tokens": tokens,
        "cached_logits": cached_logits,
        "uncached_logits": uncached,
        "plain_tokens": plain_tokens,
        "plain_logits": plain_logits,
        "scorer": scorer,
    }


def engine_generation(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter (DeepSpeed state stays out of the test process)."""
    from tests.conftest import clean_env

    out = workdir / "engine_generation.pt"
    env = {**clean_env(), "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.engine_generation", str(run_dir), str(out)],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def main(run_dir: str, out: str) -> None:
    from launcher.loop import open_session
    from launcher.recipe import load_recipe

    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    torch.save(record(open_session(recipe, Path(run_dir))), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
