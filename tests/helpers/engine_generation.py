"""Cached greedy generation on a training engine, recorded for the tests to compare.

``python -m tests.helpers.engine_generation RUN_DIR OUT.pt`` re-opens a run's session (DeepSpeed, one
process) in a fresh interpreter; `tests/helpers/megatron_worker.py` calls `record` inside its gloo pair.
Every rank must call `record` (prefill and decode are collectives); rank 0's dict is saved.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from data.formatting import IGNORE_INDEX, Batch, chat_prompt_ids, left_pad, right_pad
from eval.engine import EngineScorer

# Different lengths, so left padding and per-row positions are exercised.
PROMPTS = {
    "en": "Hello, how are you today?",
    "fr": "Bonjour, combien font deux et trois ?",
    "sw": "Habari yako? Jina lako ni nani, rafiki yangu mpendwa?",
}
STEPS = 6
FORCED = " 12 apples"


def _cached(engine: Any, ids: torch.Tensor, mask: torch.Tensor, langs: torch.Tensor, forced=None):
    """Fed ids ``[B, STEPS]`` (greedy, or ``forced[k]`` at step k) and each step's
    next-token logits ``[STEPS, B, V]``."""
    batch = Batch(ids, mask, torch.full_like(ids, IGNORE_INDEX), langs)
    logits, state = engine.prefill(batch, STEPS)
    tokens, steps = [], []
    for step in range(STEPS):
        steps.append(logits.cpu())
        pick = logits.argmax(dim=-1) if forced is None else torch.full_like(ids[:, 0], forced[step])
        tokens.append(pick.to(logits.device))
        if step + 1 < STEPS:
            logits = engine.decode(state, tokens[-1])
    engine.end_decode(state)
    return torch.stack(tokens, dim=1).cpu(), torch.stack(steps)


def record(session: Any) -> dict[str, Any]:
    """Rows of every run language in one batch (each its own shift), decoded with the cache,
    against full uncached forwards of the same sequences; and EngineScorer both ways."""
    engine, tok, languages = session.engine, session.tokenizer, session.data.languages
    langs = [lang for lang in PROMPTS if lang in languages]
    prompts = [chat_prompt_ids(tok, PROMPTS[lang], None) for lang in langs]
    lang_ids = torch.tensor([languages.index(lang) for lang in langs])
    ids, mask = left_pad(prompts, tok.pad_token_id)
    tokens, _ = _cached(engine, ids, mask, lang_ids)
    # Varied fed tokens (a tiny trained model tends to repeat one token greedily); the
    # uncached reference is one full forward over prompt + fed ids (right-padded), read at
    # the positions that predicted each fed token.
    forced = tok(FORCED)["input_ids"][:STEPS]
    fed, cached_logits = _cached(engine, ids, mask, lang_ids, forced)
    full = [p + t for p, t in zip(prompts, fed.tolist(), strict=True)]
    rids, rmask = right_pad(full, tok.pad_token_id)
    logits = engine.forward_logits(
        Batch(rids, rmask, torch.full_like(rids, IGNORE_INDEX), lang_ids)
    )
    rows = torch.arange(len(full))
    uncached = torch.stack(
        [logits[rows, torch.tensor([len(p) - 1 + k for p in prompts])].cpu() for k in range(STEPS)]
    )
    plain_tokens, _ = _cached(engine, ids, mask, torch.zeros_like(lang_ids))
    _, plain_logits = _cached(engine, ids, mask, torch.zeros_like(lang_ids), forced)
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


def check_record(rec: dict[str, Any], export: Path, langs: list[str]) -> None:
    """What the engine's cached decode must show: each step's logits equal a full uncached
    forward of the same sequence (so decode steps are shifted like the prompt), the tokens
    equal the export's shifted HF generate (``ShiftedLM``), the unshifted decode the plain
    export's, and EngineScorer answers the same with and without the cache."""
    from methods.shifcon.infer import ShiftedLM

    assert rec["langs"] == langs
    torch.testing.assert_close(rec["cached_logits"], rec["uncached_logits"], rtol=1e-4, atol=1e-4)
    lm = ShiftedLM.from_export(export)
    ids, mask = lm._prompt_batch(rec["prompts"], None, left=True)
    width = ids.shape[1]
    steps = {"max_new_tokens": STEPS, "min_new_tokens": STEPS}
    shifted = lm.generate_ids(ids, mask, rec["langs"], **steps)[:, width:]
    assert torch.equal(shifted, rec["tokens"])
    plain = lm.generate_ids(ids, mask, None, **steps)[:, width:]
    assert torch.equal(plain, rec["plain_tokens"])
    # The shift is on at every step: English rows are untouched, the others move.
    shifted_logits, unshifted = rec["cached_logits"], rec["plain_logits"]
    torch.testing.assert_close(shifted_logits[:, 0], unshifted[:, 0], rtol=0, atol=0)
    for step in range(STEPS):
        assert not torch.allclose(shifted_logits[step, 1:], unshifted[step, 1:], atol=1e-4)
    scorer = rec["scorer"]
    assert scorer["cached"] == scorer["uncached"]
    assert any(any(v) for v in scorer["cached"].values())
    assert scorer["forwards_cached"] == scorer["forwards_uncached"]


def engine_generation(run_dir: Path, workdir: Path) -> dict:
    """Run this module in a fresh interpreter and load what it saved."""
    from tests.helpers.runs import run_session_helper

    return run_session_helper("tests.helpers.engine_generation", run_dir, workdir)


def main(run_dir: str, out: str) -> None:
    from config.recipe import load_recipe
    from launcher.loop import open_session

    recipe = load_recipe(Path(run_dir) / "recipe.yaml")
    torch.save(record(open_session(recipe, Path(run_dir))), out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
