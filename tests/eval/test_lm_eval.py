"""lm-eval integration: our registered model through lm-eval's own evaluator gives the numbers of
our own tasks, with the ShifCon shift on for a ShifCon export and off for a plain one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient  # imported at collection: its platform probe forks

from eval.benchmarks import load_mgsm, load_xcopa
from eval.harness import PolyshiftLM, run_tasks, task_language
from eval.scorer import HFScorer, load_model, speaking
from eval.suite import shifcon_hooks
from eval.tasks import evaluate_mgsm, evaluate_xcopa, xcopa_request
from launcher.evaluate import main as eval_main
from methods.shifcon.math import LanguageStats
from methods.shifcon.method import save_shifcon
from tests.helpers.eval_data import XCOPA

LOGPROB_TOL = 1e-4  # fp32 on CPU: lm-eval batches the requests differently from our task


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """xcopa/sw.jsonl and mgsm/sw.jsonl as in the shared folder (rows carry no "lang": the file
    name gives it)."""
    root = tmp_path_factory.mktemp("lm_eval_data")
    (root / "xcopa").mkdir()
    (root / "mgsm").mkdir()
    with (root / "xcopa" / "sw.jsonl").open("w") as fh:
        for idx, (p, c1, c2, q, label) in enumerate(XCOPA):
            row = {"premise": p, "choice1": c1, "choice2": c2, "question": q, "label": label,
                   "idx": idx}  # fmt: skip
            fh.write(json.dumps(row) + "\n")
    with (root / "mgsm" / "sw.jsonl").open("w") as fh:
        for q, a in (("2 + 3 = ?", "5"), ("Add 1000 and 234.", "1,234")):
            fh.write(json.dumps({"question": q, "answer": a}) + "\n")
    return root


@pytest.fixture(scope="module")
def shifcon_export(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model with ShifCon vectors for en and sw (band 1..3): a ShifCon export."""
    export = tmp_path_factory.mktemp("shifcon") / "export"
    shutil.copytree(tiny_model_dir, export)
    hidden = json.loads((export / "config.json").read_text())["hidden_size"]
    stats = LanguageStats.zeros(["en", "sw"], [1, 3], hidden)
    stats.sums.normal_(generator=torch.Generator().manual_seed(0))
    stats.counts.fill_(1.0)
    save_shifcon(export, stats, (1, 3), "precompute")
    return export


def _native(export: Path, data_dir: Path) -> tuple[dict, list[list[float]], dict]:
    """Our own XCOPA and MGSM on the export (shift on where it has one, raw prompts as lm-eval
    sends them), and every row's two XCOPA log-likelihoods."""
    model, tokenizer = load_model(export, device="cpu")
    scorer = HFScorer(model, tokenizer, batch_size=2, chat=False,
                      shift=shifcon_hooks(model, export))  # fmt: skip
    rows = load_xcopa(data_dir / "xcopa" / "sw.jsonl")
    xcopa = evaluate_xcopa(scorer, {"sw": rows})
    with speaking(scorer, "sw"):
        logprobs = [[r.logprob for r in scorer.loglikelihood([(ctx, c) for c in choices])]
                    for ctx, choices in map(xcopa_request, rows)]  # fmt: skip
    mgsm = evaluate_mgsm(scorer, {"sw": load_mgsm(data_dir / "mgsm" / "sw.jsonl")}, 6)
    return {"xcopa": xcopa, "mgsm": mgsm}, logprobs, {"scorer": scorer}


def _lm_eval(lm: PolyshiftLM, data_dir: Path, task_dir: Path) -> tuple[dict, list[list[float]]]:
    results, raw = run_tasks(lm, ["xcopa_sw", "mgsm_sw"], data_dir=data_dir, task_dir=task_dir,
                             max_new_tokens=6)  # fmt: skip
    samples = sorted(raw["samples"]["xcopa_sw"], key=lambda s: s["doc_id"])
    return results, [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def _flat(rows: list[list[float]]) -> list[float]:
    return [x for row in rows for x in row]


@pytest.mark.parametrize("kind", ["plain", "shifcon"])
def test_lm_eval_equals_our_tasks(kind, tiny_model_dir, shifcon_export, data_dir, tmp_path):
    export = tiny_model_dir if kind == "plain" else shifcon_export
    want, want_lp, _ = _native(export, data_dir)
    lm = PolyshiftLM(str(export), batch_size=3, device="cpu")
    assert (lm.shifted is not None) == (kind == "shifcon")
    got, got_lp = _lm_eval(lm, data_dir, tmp_path / "tasks")
    assert got["xcopa"].counts == want["xcopa"].counts  # {"sw": {"correct": c, "total": 5}}
    assert got["xcopa"].per_language == want["xcopa"].per_language
    assert len(got_lp) == len(XCOPA)
    for g, w in zip(got_lp, want_lp, strict=True):
        assert g == pytest.approx(w, abs=LOGPROB_TOL)
    assert got["mgsm"].counts == want["mgsm"].counts
    outputs = [s["output"] for s in got["mgsm"].details["samples"]["sw"]]
    assert outputs == [s["output"] for s in want["mgsm"].details["samples"]["sw"]]


def test_the_shift_changes_scores_and_follows_the_language(
    tiny_model_dir, shifcon_export, data_dir, tmp_path
):
    shifted = PolyshiftLM(str(shifcon_export), batch_size=3, device="cpu")
    _, on = _lm_eval(shifted, data_dir, tmp_path / "on")
    _, off = _lm_eval(PolyshiftLM(str(shifcon_export), shift=False, device="cpu"), data_dir,
                      tmp_path / "off")  # fmt: skip
    _, plain = _lm_eval(PolyshiftLM(str(tiny_model_dir), device="cpu"), data_dir, tmp_path / "p")
    assert all(abs(a - b) > 1e-3 for row_on, row_off in zip(on, off, strict=True)
               for a, b in zip(row_on, row_off, strict=True))  # fmt: skip
    assert _flat(off) == pytest.approx(
        _flat(plain), abs=LOGPROB_TOL
    )  # shift=False: the plain model
    # lang=en (the dominant language) is never shifted: the unshifted scores again.
    _, english = _lm_eval(PolyshiftLM(str(shifcon_export), lang="en", device="cpu"), data_dir,
                          tmp_path / "en")  # fmt: skip
    assert _flat(english) == pytest.approx(_flat(off), abs=LOGPROB_TOL)

    # The task name gives the language; "auto" asks the export's detector for each prompt.
    assert task_language("xcopa_sw", ["en", "sw"]) == "sw"
    assert task_language("belebele_swh_Latn", ["en", "sw"]) is None
    assert task_language("mgsm_direct_zh", ["en", "sw"]) == "zh"  # no vectors: unshifted
    texts = ["The man turned on the faucet kwa hiyo", "Mwanamke alistaafu kwa hiyo"]
    auto = PolyshiftLM(str(shifcon_export), lang="auto", device="cpu")
    detected = auto.shifted.detect(texts)
    assert auto.request_languages(["xcopa_sw", "xcopa_sw"], texts) == detected
    assert shifted.request_languages(["xcopa_sw", "arc_easy"], texts) == ["sw", detected[1]]


@pytest.mark.slow
def test_cli_lm_eval_logs_like_our_tasks(shifcon_export, data_dir, tmp_path, mlflow_server, capsys):
    out = tmp_path / "res" / "results.json"
    code = eval_main(["--harness", "lm-eval", "--tasks", "xcopa,mgsm", "--languages", "sw",
                      "--model", str(shifcon_export), "--data-dir", str(data_dir),
                      "--max-new-tokens", "4", "--out", str(out), "--tracking-uri", mlflow_server,
                      "--experiment", "lm-eval-cli", "--run-name", "lm"])  # fmt: skip
    assert code == 0
    assert "| lang | XCOPA acc | MGSM acc |" in capsys.readouterr().out
    payload = json.loads(out.read_text())
    assert payload["harness"] == "lm-eval" and payload["shift"] is True
    assert payload["tasks"]["xcopa"]["counts"]["sw"]["total"] == len(XCOPA)
    assert (out.parent / "lm_eval_tasks" / "xcopa_sw.yaml").is_file()
    client = MlflowClient(mlflow_server)
    [run] = client.search_runs([client.get_experiment_by_name("lm-eval-cli").experiment_id])
    acc = payload["tasks"]["xcopa"]["per_language"]["sw"]
    assert run.data.metrics["eval/xcopa/acc/sw"] == pytest.approx(acc)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
    assert {"eval/results.md", "eval/lm_eval_results.json", "eval/eval_results.png"} <= artifacts

    # A missing file, a path, an unknown task, no language; then a good task on no model.
    bad_tasks = ("xcopa_xx", "xcopa_../xcopa/sw", "no_such_task_anywhere", "xcopa", "xcopa_sw")
    for bad in (["--tasks", t] for t in bad_tasks):
        args = ["--harness", "lm-eval", "--model", "x", "--data-dir", str(data_dir), *bad]
        assert eval_main(args) == 2


def test_rolling_loglikelihood_scores_every_token_once(tiny_model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows

    text = "Ana tufaha tatu na machungwa mawili."
    request = Instance("loglikelihood_rolling", {}, (text,), 0, ("wikitext", 0, 1))
    [whole] = PolyshiftLM(str(tiny_model_dir), device="cpu").loglikelihood_rolling([request])
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    [direct] = HFScorer(model, tokenizer).loglikelihood([("", text)])  # one window: the same
    assert whole == pytest.approx(direct.logprob, abs=LOGPROB_TOL)
    # Windows of 8 tokens (lm-eval's disjoint rolling windows): each token is predicted once.
    short = HFScorer(model, tokenizer, max_length=8)
    [windowed] = PolyshiftLM(scorer=short).loglikelihood_rolling([request])
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = get_rolling_token_windows(ids, tokenizer.eos_token_id, 8, 1)
    expected, predicted = 0.0, []
    with torch.no_grad():
        for inputs, targets in windows:  # unbatched forwards, one per window
            logprobs = torch.log_softmax(model(torch.tensor([inputs])).logits[0], dim=-1)
            offset = len(inputs) - len(targets)
            expected += sum(float(logprobs[offset + k, tok]) for k, tok in enumerate(targets))
            predicted += targets
    assert predicted == ids and len(ids) > 16  # several windows
    assert windowed != pytest.approx(whole, abs=1e-2)
    assert windowed == pytest.approx(expected, abs=1e-3)
