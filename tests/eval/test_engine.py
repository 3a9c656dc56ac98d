"""Benchmarks on the training engine: EngineScorer against HFScorer, and the recipe's eval:
section after a real 2-process ZeRO-3 run (ShifCon, so the per-language shift is exercised)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from config.errors import UserError
from config.schema import EvalSection, Recipe
from data.formatting import Batch
from eval.engine import EngineScorer, check_benchmarks
from eval.scorer import HFScorer, eos_ids, load_model
from eval.suite import EvalOptions, evaluate, shifcon_hooks
from methods.base import SFT
from parallel.distributed import DistContext
from parallel.engine import Engine
from tests.helpers.eval_data import PAIRS, XCOPA
from tests.helpers.runs import run_cli, tiny_recipe, write_recipe

LOGPROB_TOL = 1e-4  # fp32 on CPU: batched vs. one-row forwards, ZeRO-3 vs. a plain model


class OneProcessEngine(Engine):
    """The Engine interface on one process over a plain HF model: what a 1-process evaluation
    runs EngineScorer on (the partitioned DeepSpeed engine is exercised by the CLI test)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.method, self.config = model, SFT(), {}
        self.ctx = DistContext(rank=0, world_size=1, local_rank=0, device="cpu")

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.model

    @torch.no_grad()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        return self.method.logits(self.model, batch)

    def train_step(self, micro_batches, lr):  # pragma: no cover - evaluation only
        raise NotImplementedError

    def param_counts(self) -> tuple[int, int]:
        n = sum(p.numel() for p in self.model.parameters())
        return n, n

    def save(self, root, tag, client_state):  # pragma: no cover - evaluation only
        raise NotImplementedError

    def load(self, root, tag):  # pragma: no cover - evaluation only
        raise NotImplementedError

    def export(self, directory):  # pragma: no cover - evaluation only
        raise NotImplementedError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """XCOPA, MGSM and parallel files for en/sw, one sw XCOPA row more than en (uneven shards)."""
    root = tmp_path_factory.mktemp("shared")
    for folder in ("xcopa", "mgsm", "parallel/gsm8k_questions"):
        (root / folder).mkdir(parents=True)
    for lang, rows in (("en", XCOPA[:4]), ("sw", XCOPA)):
        with (root / "xcopa" / f"{lang}.jsonl").open("w") as fh:
            for idx, (p, c1, c2, q, label) in enumerate(rows):
                fh.write(json.dumps({"premise": p, "choice1": c1, "choice2": c2, "question": q,
                                     "label": label, "idx": idx, "lang": lang}) + "\n")  # fmt: skip
        with (root / "mgsm" / f"{lang}.jsonl").open("w") as fh:
            for q, a in (("2 + 3 = ?", "5"), ("10 - 4 = ?", "6"), ("Add 1000 and 234.", "1,234")):
                fh.write(json.dumps({"lang": lang, "question": q, "answer": a}) + "\n")
    with (root / "parallel/gsm8k_questions/sw.jsonl").open("w") as fh:
        for en, sw in PAIRS:
            fh.write(json.dumps({"lang": "sw", "en": en, "target": sw}) + "\n")
    return root


def _scorers(model: Any, tokenizer: Any, batch_size: int) -> tuple[EngineScorer, HFScorer]:
    engine = EngineScorer(OneProcessEngine(model), tokenizer, ["en", "sw"], batch_size=batch_size,
                          max_length=512, stop_ids=eos_ids(model, tokenizer))  # fmt: skip
    return engine, HFScorer(model, tokenizer, batch_size=batch_size)


def test_engine_scorer_equals_hf_scorer(tiny):
    model, tokenizer = tiny
    requests = [("The man turned on the faucet therefore", " water flowed out."),
                ("", "Ana tufaha tatu."), ("Hi", " there, how are you doing today?")]  # fmt: skip
    prompts = ["What is 2 + 3?", "Hi", "Count the apples in the basket, please."]
    texts = [p[0] for p in PAIRS]
    for batch_size in (1, 2):  # one-row forwards and right-padded batches
        engine, hf = _scorers(model, tokenizer, batch_size)
        got, want = engine.loglikelihood(requests), hf.loglikelihood(requests)
        assert [g.num_tokens for g in got] == [w.num_tokens for w in want]
        assert [g.greedy for g in got] == [w.greedy for w in want]
        for g, w in zip(got, want, strict=True):
            assert abs(g.logprob - w.logprob) < LOGPROB_TOL
        # Greedy without a KV cache on right-padded rows == HF generate (cache, left padding).
        generated = engine.generate(prompts, max_new_tokens=8)
        assert generated == hf.generate(prompts, max_new_tokens=8)
        assert any(generated)
        torch.testing.assert_close(
            engine.hidden_states(texts), hf.hidden_states(texts), atol=1e-5, rtol=1e-4
        )
    assert engine.hidden_states([]).shape[0] == 0


def test_engine_task_results_equal_hf_on_every_format(tiny, data_dir):
    model, tokenizer = tiny
    options = EvalOptions(tasks=["xcopa", "mgsm", "bitext", "ppl"], languages=["en", "sw"],
                          data_dir=data_dir, max_new_tokens=5, batch_size=2)  # fmt: skip
    engine, hf = _scorers(model, tokenizer, 2)
    got, _ = evaluate(engine, options)
    want, _ = evaluate(hf, options)
    _assert_same_results({k: r.to_dict() for k, r in got.items()},
                         {k: r.to_dict() for k, r in want.items()})  # fmt: skip
    assert engine.forwards > 0


def _assert_same_results(got: dict, want: dict) -> None:
    """Same counts and outputs; log-likelihood sums within LOGPROB_TOL per request."""
    assert sorted(got) == sorted(want)
    for task in ("xcopa", "mgsm"):
        if task not in want:
            continue
        assert got[task]["counts"] == want[task]["counts"], task
        for lang, samples in want[task]["details"]["samples"].items():
            # Samples are the first rows of rank 0's shard: compare the rows both hold.
            theirs = {w["idx"]: w for w in samples}
            mine = [g for g in got[task]["details"]["samples"][lang] if g["idx"] in theirs]
            assert mine and mine[0]["idx"] == 0
            for g in mine:
                w = theirs[g["idx"]]
                if task == "mgsm":
                    assert g == w, (lang, g, w)
                else:
                    assert g["pred"] == w["pred"]
                    assert g["logprobs"] == pytest.approx(w["logprobs"], abs=LOGPROB_TOL)
    if "bitext" in want:
        assert got["bitext"]["details"] == want["bitext"]["details"]
    if "ppl" in want:
        for lang, c in want["ppl"]["counts"].items():
            g = got["ppl"]["counts"][lang]
            assert (g["tokens"], g["bytes"]) == (c["tokens"], c["bytes"])
            assert g["nll"] == pytest.approx(c["nll"], abs=LOGPROB_TOL * 8)


def test_eval_section_validation_and_preflight(tmp_path, data_dir):
    recipe = Recipe(name="x")
    assert not recipe.eval.enabled and recipe.eval.tasks == []  # existing recipes: nothing runs
    with pytest.raises(ValueError, match="files"):
        EvalSection(tasks=["mgsm"], files={"mgsm": "mgsm.jsonl"})
    with pytest.raises(ValueError, match="tasks"):
        EvalSection(tasks=["hellaswag"])

    bad = tmp_path / "mgsm"
    bad.mkdir()
    (bad / "sw.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "x"}\n')
    section = EvalSection(tasks=["mgsm"], files={"mgsm": str(bad / "{lang}.jsonl")})
    session = SimpleNamespace(recipe=Recipe(name="x", eval=section),
                              data=SimpleNamespace(languages=["en", "sw"]))  # fmt: skip
    with pytest.raises(UserError, match=rf'eval: {bad / "sw.jsonl"}:2: missing field "answer"'):
        check_benchmarks(session)
    session.recipe = Recipe(name="x", eval={"tasks": ["xcopa"], "data_dir": str(tmp_path)})
    with pytest.raises(UserError, match="no benchmark data"):
        check_benchmarks(session)
    session.recipe = Recipe(name="x", eval={"tasks": ["xcopa"], "data_dir": str(data_dir)})
    check_benchmarks(session)  # en and sw files exist and parse


def _hf_reference(export: Path, data_dir: Path, shift: bool) -> tuple[dict, int]:
    """1-process evaluation of the export with HFScorer, and EngineScorer's forward count on it."""
    model, tokenizer = load_model(export, device="cpu")
    hooks = shifcon_hooks(model, export) if shift else None
    options = EvalOptions(tasks=["xcopa", "mgsm", "bitext", "ppl"], languages=["en", "sw"],
                          data_dir=data_dir, max_new_tokens=4, batch_size=2)  # fmt: skip
    results, _ = evaluate(HFScorer(model, tokenizer, batch_size=2, shift=hooks), options)
    if hooks is not None:
        hooks.remove()
    engine = EngineScorer(OneProcessEngine(model), tokenizer, ["en", "sw"], batch_size=2,
                          max_length=512, shift=False)  # fmt: skip
    evaluate(engine, options)  # unshifted is enough for counting forwards
    return {k: r.to_dict() for k, r in results.items()}, engine.forwards


@pytest.mark.slow
def test_two_process_zero3_eval_section_equals_one_process_export_eval(
    tmp_path, tiny_model_dir, data_dir
):
    eval_section = {"tasks": ["xcopa", "mgsm", "bitext", "ppl"], "languages": ["en", "sw", "zz"],
                    "data_dir": str(data_dir), "batch_size": 2, "max_new_tokens": 4}  # fmt: skip
    recipe = tiny_recipe(tiny_model_dir, tmp_path, training={"steps": 2}, eval=eval_section,
                         method={"name": "shifcon", "band": [1, 3], "mcl_batch_size": 4,
                                 "vector_samples": 8})  # fmt: skip
    path = write_recipe(tmp_path / "r.yaml", recipe)
    proc = run_cli(str(path), "--set", "cluster.workers_per_node=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "benchmarks on the training engine:" in proc.stdout
    assert proc.stdout.count("| lang | XCOPA acc |") == 1  # printed on rank 0 only
    run = tmp_path / "runs" / "tiny"
    payload = json.loads((run / "eval" / "results.json").read_text())
    assert (run / "eval" / "eval_results.png").stat().st_size > 0
    assert payload["world_size"] == 2 and "zz" in payload["skipped"]["xcopa"]
    summary = json.loads((run / "summary.json").read_text())
    assert (
        summary["benchmarks"]["eval/xcopa/acc/sw"]
        == payload["tasks"]["xcopa"]["per_language"]["sw"]
    )

    want, single_forwards = _hf_reference(run / "export", data_dir, shift=True)
    _assert_same_results(payload["tasks"], want)
    # Sharded: each rank ran fewer forwards than one process scoring everything.
    assert payload["forwards_per_rank"] < single_forwards
    # The shift is on: unshifted scores of the shifted language differ, English's do not.
    plain, _ = _hf_reference(run / "export", data_dir, shift=False)
    sw = lambda r: r["xcopa"]["details"]["samples"]["sw"][0]["logprobs"]  # noqa: E731
    en = lambda r: r["xcopa"]["details"]["samples"]["en"][0]["logprobs"]  # noqa: E731
    assert not math.isclose(sw(plain)[0], sw(payload["tasks"])[0], abs_tol=1e-3)
    assert en(plain) == pytest.approx(en(payload["tasks"]), abs=LOGPROB_TOL)
