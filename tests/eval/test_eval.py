"""Evaluation harness: metrics on hand-made cases, answer extraction, bad rows, sharded eval."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from eval.answers import extract_number, numbers_match, parse_gold
from eval.benchmarks import BenchmarkError, load_mgsm, load_parallel, load_xcopa
from eval.report import log_results, markdown_table
from eval.scorer import HFScorer, LoglikelihoodResult, Scorer, load_model
from eval.suite import EvalOptions, evaluate
from eval.tasks import evaluate_mgsm, evaluate_xcopa, xcopa_request
from launcher.evaluate import main as eval_main
from tests.helpers.eval_data import PAIRS, XCOPA


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and immune to other jobs on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shared")
    for folder in ("xcopa", "mgsm", "parallel/gsm8k_questions"):
        (root / folder).mkdir(parents=True)
    for lang in ("en", "sw"):
        with (root / "xcopa" / f"{lang}.jsonl").open("w") as fh:
            for idx, (p, c1, c2, q, label) in enumerate(XCOPA):
                row = {"premise": p, "choice1": c1, "choice2": c2, "question": q,
                       "label": label, "idx": idx, "changed": False, "lang": lang}  # fmt: skip
                fh.write(json.dumps(row) + "\n")
        with (root / "mgsm" / f"{lang}.jsonl").open("w") as fh:
            for q, a in (("2 + 3 = ?", "5"), ("10 - 4 = ?", "6"), ("1000 + 234 = ?", "1,234")):
                fh.write(json.dumps({"lang": lang, "question": q, "answer": a}) + "\n")
    with (root / "parallel/gsm8k_questions/sw.jsonl").open("w") as fh:
        for en, sw in PAIRS:
            fh.write(json.dumps({"lang": "sw", "en": en, "target": sw}) + "\n")
    return root


# -- answer extraction --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42.", 42.0),
        ("She sold 1,234 eggs", 1234.0),
        ("Total: 1,234,567.89 dollars", 1234567.89),
        ("It dropped to -7 degrees.", -7.0),
        ("−3", -3.0),
        ("pages 3-5", 5.0),
        ("answer: 0.5 kg", 0.5),
        ("$.75", 0.75),
        ("First 12 apples, then 30 more, so 42 apples in total.", 42.0),
        ("#### 72\n", 72.0),
        ("He earns $18.", 18.0),
        ("10%", 10.0),
        ("答案是-5。", -5.0),
        ("１２", 12.0),
        ("1\u202f234 francs", 1234.0),
        ("12,34", 34.0),  # not a thousands group: two numbers
        ("no number here", None),
    ],
)
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_gold_parsing_and_matching():
    assert parse_gold("57,500") == 57500.0 and parse_gold(3) == 3.0 and parse_gold(" 18 ") == 18.0
    for bad in ("abc", "", True, None, "12 apples", float("nan")):
        with pytest.raises(ValueError):
            parse_gold(bad)
    assert numbers_match(18.0, 18.0) and numbers_match(1234.0000001, 1234.0)
    assert not numbers_match(None, 0.0) and not numbers_match(17.0, 18.0)


# -- malformed rows -----------------------------------------------------------------------------


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_malformed_rows_name_file_and_line(tmp_path):
    good = json.dumps({"premise": "p", "choice1": "a", "choice2": "b", "question": "cause",
                       "label": 0})  # fmt: skip
    bad_label = good.replace('"label": 0', '"label": 2')
    path = _write_lines(tmp_path / "sw.jsonl", [good, "", bad_label])
    with pytest.raises(BenchmarkError) as err:
        load_xcopa(path)
    assert str(err.value).startswith(f'{path}:3: field "label" must be 0 or 1, got 2')
    assert len(load_xcopa(path, limit=1)) == 1  # rows past the limit are not read

    cases = {
        good.replace('"label": 0', '"label": true'): 'field "label" must be 0 or 1',
        good.replace('"cause"', '"why"'): 'field "question" must be "cause" or "effect"',
        good.replace('"premise": "p", ', ""): 'missing field "premise"',
        good.replace('"a"', '""'): 'field "choice1" must be a non-empty string',
        "{not json": "invalid JSON",
        "[1, 2]": "line is not a JSON object",
    }
    for line, message in cases.items():
        path = _write_lines(tmp_path / "x.jsonl", [good, line])
        with pytest.raises(BenchmarkError, match=r"x\.jsonl:2: ") as err:
            load_xcopa(path)
        assert message in str(err.value)

    mgsm = _write_lines(tmp_path / "m.jsonl", ['{"question": "q", "answer": "12"}',
                                               '{"question": "q", "answer": "twelve"}'])  # fmt: skip
    with pytest.raises(BenchmarkError, match=r'm\.jsonl:2: field "answer" must be a number'):
        load_mgsm(mgsm)
    par = _write_lines(tmp_path / "p.jsonl", ['{"en": "a"}'])
    with pytest.raises(BenchmarkError, match=r'p\.jsonl:1: missing field "target"'):
        load_parallel(par)


# -- metrics against direct computations ---------------------------------------------------------


def _direct_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """Independent reference: one unpadded forward, sum of the continuation's token log-probs."""
    ctx = tokenizer(context)["input_ids"]
    full = tokenizer(context + continuation)["input_ids"]
    assert full[: len(ctx)] == ctx
    with torch.no_grad():
        logits = model(torch.tensor([full])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    return sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full)))


def test_multiple_choice_picks_the_argmax_of_direct_loglikelihoods(tiny, data_dir):
    model, tokenizer = tiny
    rows = load_xcopa(data_dir / "xcopa" / "sw.jsonl")
    scorer = HFScorer(model, tokenizer, batch_size=4)  # padding across rows of other lengths
    result = evaluate_xcopa(scorer, {"sw": rows})
    expected_correct = 0
    for row in rows:
        context, choices = xcopa_request(row)
        direct = [_direct_logprob(model, tokenizer, context, c) for c in choices]
        harness = scorer.loglikelihood([(context, c) for c in choices])
        assert [h.logprob for h in harness] == pytest.approx(direct, abs=1e-4)
        expected_correct += int(max((0, 1), key=lambda k: (direct[k], -k)) == row.label)
    assert result.counts["sw"] == {"correct": expected_correct, "total": len(rows)}
    assert result.per_language["sw"] == expected_correct / len(rows)
    assert xcopa_request(rows[0])[0] == "The man turned on the faucet kwa hiyo"


def test_perplexity_and_bitext_match_direct_computation(tiny, data_dir):
    model, tokenizer = tiny
    scorer = HFScorer(model, tokenizer, batch_size=3)
    text = "Ana tufaha tatu."
    [res] = scorer.loglikelihood([("", text)])
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], dim=-1)
    direct = sum(float(logprobs[t - 1, ids[t]]) for t in range(1, len(ids)))
    assert res.num_tokens == len(ids) - 1 and res.logprob == pytest.approx(direct, abs=1e-4)

    states = scorer.hidden_states([p[0] for p in PAIRS])  # [N, L+1, D], batched with padding
    for i, (en, _) in enumerate(PAIRS):
        with torch.no_grad():
            out = model(torch.tensor([tokenizer(en)["input_ids"]]), output_hidden_states=True)
        direct_states = torch.stack(out.hidden_states)[:, 0, 1:].mean(dim=1)  # sink left out
        torch.testing.assert_close(states[i], direct_states, atol=1e-5, rtol=1e-4)

    options = EvalOptions(tasks=["bitext", "ppl"], languages=["en", "sw"], data_dir=data_dir)
    results, skipped = evaluate(scorer, options)
    assert "bitext" in skipped and "en" in skipped["bitext"]
    bitext = results["bitext"].details["sw"]
    assert len(bitext["x2en"]) == model.config.num_hidden_layers + 1
    assert all(0.0 <= a <= 1.0 for a in bitext["x2en"] + bitext["en2x"])
    assert results["ppl"].per_language["sw"] > 1 and results["ppl"].per_language["en"] > 1
    counts = results["ppl"].counts["sw"]
    assert counts["bytes"] == sum(len(p[1].encode()) for p in PAIRS)
    assert results["ppl"].details["sw"]["bits_per_byte"] == pytest.approx(
        counts["nll"] / counts["bytes"] / math.log(2)
    )


def test_generation_batched_left_padding_equals_one_by_one(tiny):
    model, tokenizer = tiny
    prompts = ["What is 2 + 3?", "Hi", "Count the apples in the basket, please."]
    one = HFScorer(model, tokenizer, batch_size=1).generate(prompts, max_new_tokens=6)
    batched = HFScorer(model, tokenizer, batch_size=3).generate(prompts, max_new_tokens=6)
    assert one == batched


class CannedScorer:
    """A Scorer that answers from a table: checks the MGSM metric without a model."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers

    def loglikelihood(self, requests):
        return [LoglikelihoodResult(-float(len(c)), len(c), False) for _, c in requests]

    def generate(self, prompts, max_new_tokens):
        return [self.answers[p] for p in prompts]

    def hidden_states(self, texts):
        return torch.zeros(len(texts), 2, 4)


def test_mgsm_accuracy_with_extraction(data_dir):
    rows = load_mgsm(data_dir / "mgsm" / "sw.jsonl")
    scorer = CannedScorer({"2 + 3 = ?": "2 + 3 makes 5.", "10 - 4 = ?": "It is 7, not 6 or 5",
                           "1000 + 234 = ?": "The answer is 1,234 eggs."})  # fmt: skip
    assert isinstance(scorer, Scorer)
    result = evaluate_mgsm(scorer, {"sw": rows})
    assert result.counts["sw"] == {"correct": 2.0, "total": 3.0}
    assert result.details["samples"]["sw"][2]["predicted"] == 1234.0


class RecordingTracker:
    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = {}
        self.artifacts: list[str] = []
        self.texts: dict[str, str] = {}

    def log_metrics(self, metrics, step):
        for k, v in metrics.items():
            self.metrics.setdefault(k, []).append((step, v))

    def log_text(self, text, artifact_file):
        self.texts[artifact_file] = text

    def log_dict(self, obj, artifact_file):
        self.texts[artifact_file] = json.dumps(obj)

    def log_artifact(self, path, artifact_path=None):
        assert Path(path).is_file()
        self.artifacts.append(Path(path).name)


def test_cli_prints_table_writes_json_and_logs(tiny_model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    code = eval_main(["--model", str(tiny_model_dir), "--tasks", "xcopa,mgsm,bitext,ppl",
                      "--languages", "sw,en,zz", "--data-dir", str(data_dir), "--limit", "3",
                      "--max-new-tokens", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert (
        "| lang | XCOPA acc | MGSM acc | bitext acc (best layer) | perplexity (bits/byte) |"
        in captured.out
    )
    assert "| sw |" in captured.out and "xcopa/zz skipped" in captured.err
    payload = json.loads(out.read_text())
    assert payload["tasks"]["xcopa"]["counts"]["sw"]["total"] == 3
    assert (out.parent / "eval_results.png").stat().st_size > 0
    assert (out.parent / "bitext_layers.png").stat().st_size > 0

    tracker = RecordingTracker()
    results = {
        "xcopa": evaluate_xcopa(CannedScorer({}), {"sw": load_xcopa(data_dir / "xcopa/sw.jsonl")})
    }
    log_results(results, tracker, out_dir=tmp_path / "charts")
    assert "eval/xcopa/acc/sw" in tracker.metrics and "eval_results.png" in tracker.artifacts
    assert tracker.texts["eval/results.md"] == markdown_table(results)
    assert eval_main(["--model", "x", "--tasks", "nope", "--languages", "sw"]) == 2


# -- distributed ------------------------------------------------------------------------------------


def _dist_worker(rank: int, world: int, port: int, model_dir: str, data_dir: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        result = _run_all(model_dir, data_dir)
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
        dist.barrier()  # neither rank tears the group down while the other still uses it
    finally:
        dist.destroy_process_group()


def _run_all(model_dir: str, data_dir: str) -> dict:
    model, tokenizer = load_model(model_dir, device="cpu")
    scorer = HFScorer(model, tokenizer, batch_size=1)  # identical per-row math in any layout
    calls = {"loglikelihood": 0}
    inner = scorer.loglikelihood

    def counting(requests):
        calls["loglikelihood"] += len(requests)
        return inner(requests)

    scorer.loglikelihood = counting  # type: ignore[method-assign]
    options = EvalOptions(tasks=["xcopa", "mgsm", "bitext", "ppl"], languages=["en", "sw"],
                          data_dir=Path(data_dir), max_new_tokens=3)  # fmt: skip
    results, _ = evaluate(scorer, options)
    return {"results": {k: r.to_dict() for k, r in results.items()}, "calls": calls}


@pytest.mark.slow
def test_two_process_sharded_eval_equals_one_process(tiny_model_dir, data_dir, tmp_path):
    import torch.multiprocessing as mp

    from parallel.distributed import free_port

    single = _run_all(str(tiny_model_dir), str(data_dir))
    mp.spawn(_dist_worker, args=(2, free_port(), str(tiny_model_dir), str(data_dir), str(tmp_path)),
             nprocs=2, join=True)  # fmt: skip
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for task, result in ranks[0]["results"].items():  # every rank holds the reduced numbers
        other = ranks[1]["results"][task]
        assert (result["per_language"], result["counts"]) == (
            other["per_language"],
            other["counts"],
        )
    # Each rank scored only its shard: 5 XCOPA rows x 2 choices x 2 languages + 4 ppl texts.
    assert (
        ranks[0]["calls"]["loglikelihood"] + ranks[1]["calls"]["loglikelihood"]
        == (single["calls"]["loglikelihood"])
    )
    assert ranks[0]["calls"]["loglikelihood"] < single["calls"]["loglikelihood"]
    got, want = ranks[0]["results"], single["results"]
    for task in ("xcopa", "mgsm", "bitext"):
        assert got[task]["per_language"] == want[task]["per_language"], task
        assert got[task]["counts"] == want[task]["counts"], task
    assert got["bitext"]["details"] == want["bitext"]["details"]
    for lang, value in want["ppl"]["per_language"].items():
        assert math.isclose(got["ppl"]["per_language"][lang], value, rel_tol=1e-9)
