"""Lens on the tiny model under DeepSpeed ZeRO-3: only the top k layers change, English stays
near the reference while the targets' agnostic-direction gap shrinks."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.schema import LensMethod
from data.formatting import right_pad
from methods.lens import DIRECTIONS_FILE, META_FILE, Lens
from tests.helpers.runs import run_data, summary, train, weights

pytestmark = pytest.mark.slow  # every test here runs the launcher in fresh processes

torch.set_num_threads(1)
LENS = {
    "name": "lens",
    "top_k": 2,
    "retain": 10.0,
    "pull": 1.0,
    "push_scale": 0.5,
    "prompts": {"count": 40, "batch_size": 8},
}
ENGLISH_TOLERANCE = 0.15  # relative change of English pooled top-layer states


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def lens_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lens")
    proc, run = train(
        tmp, tiny_model_dir, "lens", f"method={json.dumps(LENS)}", "training.steps=8",
        "training.lr=3e-4",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_only_top_k_layers_change(lens_run, tiny_model_dir):
    after = weights(lens_run)
    before = load_file(tiny_model_dir / "model.safetensors")
    assert after.keys() == before.keys()
    top = ("model.layers.2.", "model.layers.3.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(top) for k in changed), sorted(changed)
    assert any(k.startswith("model.layers.2.") for k in changed)
    assert any(k.startswith("model.layers.3.") for k in changed)
    meta = json.loads((lens_run / "export" / META_FILE).read_text())
    assert meta["top_k"] == 2 and meta["trained_layers"] == [3, 4]
    assert (lens_run / "export" / DIRECTIONS_FILE).is_file()
    metrics = summary(lens_run)["method_metrics"]
    assert {"loss_retain", "loss_push", "loss_pull"} <= set(metrics[0])


def test_english_kept_and_agnostic_gap_shrinks(lens_run, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = run_data(tokenizer)
    method = Lens(
        LensMethod(**LENS),
        languages=data.languages,
        tokenizer=tokenizer,
        train_rows=data.train_rows,
        seed=0,
    )
    ref = _model(tiny_model_dir)
    method.attach(ref)
    method.prepare(ref, data.train, batch_size=8)
    edited = _model(lens_run / "export")
    pairs = method.pairs
    prompts, _ = method.pair_rows(range(len(pairs)))
    ids, mask = right_pad([method.prompt_ids(i) for i in prompts], method.tokenizer.pad_token_id)
    with torch.no_grad():
        h0 = method.top_states(ref, ids, mask)
        h1 = method.top_states(edited, ids, mask)
    # The reference table (theta_0's pooled states, from `prepare`) is what h0 recomputes.
    torch.testing.assert_close(method.reference[prompts], h0, rtol=1e-5, atol=1e-5)
    n = len(pairs)
    drift = (h1[:n] - h0[:n]).norm(dim=-1) / h0[:n].norm(dim=-1)
    assert float(drift.mean()) < ENGLISH_TOLERANCE, drift

    a = method.found.a

    def gap(h):  # |a . (h_en - h_X)| per pair: the agnostic-direction gap
        return ((h[:n] - h[n:]) @ a).abs()

    before, after = gap(h0), gap(h1)
    for lang in ("fr", "sw"):
        sel = torch.tensor([p.lang == lang for p in pairs])
        assert float(after[sel].mean()) < float(before[sel].mean()), lang
