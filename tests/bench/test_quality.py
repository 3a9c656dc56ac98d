"""bench.quality --quick end to end on a small shared-data folder made here; and the split."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from data.gsm8k_shared import is_heldout, load_items

ROOT = Path(__file__).resolve().parents[2]
WORDS = {"fr": "combien de pommes", "sw": "maapulo mangapi"}


def shared_folder(root: Path, n: int = 40) -> Path:
    """The layout of ../shared/data (parallel questions + English answers), small and made up."""
    (root / "parallel" / "gsm8k_questions").mkdir(parents=True)
    (root / "instruct").mkdir()
    questions = [f"Tom has {i} apples and buys {i + 3} more. How many?" for i in range(n)]
    answers = [
        {
            "lang": "en",
            "instruction": q,
            "response": f"{i} + {i + 3} = {2 * i + 3}\n#### {2 * i + 3}",
        }
        for i, q in enumerate(questions)
    ]
    (root / "instruct" / "gsm8k_en.jsonl").write_text("\n".join(map(json.dumps, answers)) + "\n")
    for lang, words in WORDS.items():
        rows = [
            {"lang": lang, "en": q, "target": f"Tom {words} {i} {i + 3} ?"}
            for i, q in reversed(list(enumerate(questions)))  # another order than the answers
        ]
        path = root / "parallel" / "gsm8k_questions" / f"{lang}.jsonl"
        path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return root


def test_split_is_deterministic_and_disjoint(tmp_path):
    data = shared_folder(tmp_path / "shared", n=200)
    train = load_items(data, ["en", "fr", "sw"], split="train")
    held = load_items(data, ["en", "fr", "sw"], split="heldout")
    assert {i.en for i in train}.isdisjoint({i.en for i in held})
    assert len(train) + len(held) == 200 and 20 <= len(held) <= 60  # about 20 %
    assert all(is_heldout(i.en) for i in held) and not any(is_heldout(i.en) for i in train)
    # the answer and the translations are joined by the English text, not by file position
    item = held[0]
    n = int(item.en.split()[2])
    assert item.answer.endswith(f"#### {2 * n + 3}") and item.questions["fr"].endswith(
        f"{n} {n + 3} ?"
    )


def test_untranslated_rows_are_not_items_of_that_language(tmp_path):
    data = shared_folder(tmp_path / "shared", n=200)
    path = data / "parallel" / "gsm8k_questions" / "fr.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    rows[0]["target"] = rows[0]["en"] + " "  # left in English
    path.write_text("\n".join(map(json.dumps, rows)) + "\n")
    both = {i.en for s in ("train", "heldout") for i in load_items(data, ["en", "fr"], split=s)}
    assert len(both) == 199 and rows[0]["en"] not in both
    sw_only = {i.en for s in ("train", "heldout") for i in load_items(data, ["en", "sw"], split=s)}
    assert rows[0]["en"] in sw_only


@pytest.mark.slow
def test_quick_benchmark_end_to_end(tmp_path):
    data = shared_folder(tmp_path / "shared")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.quality", "--quick", "--data-dir", str(data)]
    cmd += ["--out", str(out), "--languages", "en,fr,sw", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = (out / "quality.md").read_text()
    assert "| sft | 0 |" in table and "| shifcon | 0 |" in table
    assert (out / "quality.png").stat().st_size > 10_000
    rows = json.loads((out / "quality.json").read_text())
    for row in rows:
        res = row["result"]
        assert set(res["nll"]) == {"en", "fr", "sw"}
        for lang in ("fr", "sw"):  # the gap is the NLL difference to English on the same items
            assert abs(res["gap"][lang] - (res["nll"][lang] - res["nll"]["en"])) < 1e-9
    shifcon = next(r for r in rows if r["label"] == "shifcon")
    assert len(shifcon["mcl"]) == 2 and "detection" in shifcon["result"]
    # no held-out question is trained on
    held = {i.en for i in load_items(data, ["en", "fr", "sw"], split="heldout")}
    trained = [json.loads(x)["instruction"] for x in (out / "data" / "train.jsonl").open()]
    assert held and held.isdisjoint(trained)
    # every run is in MLflow, with the quality metrics in the training run itself
    db = sqlite3.connect(out / "mlflow.db")
    names = {r[0] for r in db.execute("select name from runs")}
    gaps = db.execute("select count(*) from metrics where key = 'quality/gap_mean'").fetchone()[0]
    assert {"sft_s0", "shifcon_s0"} <= names and gaps == 2


@pytest.mark.slow
def test_missing_data_dir_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "-m", "bench.quality", "--quick", "--data-dir", str(tmp_path / "nope")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "shared data folder" in proc.stderr
