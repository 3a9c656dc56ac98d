"""LoRA runs of the launcher on the tiny Llama (DeepSpeed ZeRO-3, CPU gloo): only the adapters
train, the merged export and the peft adapter give the engine's logits, ShifCon's shift still
acts through the adapted layers, and a 2-process run learns."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from launcher.checkpoints import CheckpointStore
from tests.helpers.lora_session import lora_session
from tests.helpers.runs import summary, train

pytestmark = pytest.mark.slow  # every test here runs the launcher in fresh processes

LORA = {"enabled": True, "rank": 4, "alpha": 8, "dropout": 0.05}
SHIFCON = {"name": "shifcon", "band": [1, 3], "mcl_batch_size": 4, "vector_samples": 8}
FAST = ("training.lr=1e-2", "training.steps=4")
SFT_LORA = {**LORA, "layers": [2, 3, 4]}
SFT_SETS = (*FAST, "checkpoint.every=2")  # steps 2 and 4 kept: the resume test starts from 2


def _content(ref: dict) -> torch.Tensor:
    return ref["attention_mask"].bool()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("lora_sft")
    proc, run = train(tmp, tiny_model_dir, "lora_sft", *SFT_SETS, lora=SFT_LORA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "lora: 12,288 trainable parameters" in proc.stdout
    return run, lora_session(run, tmp)


def test_only_adapter_weights_change(sft_run, tiny_model_dir):
    _, ref = sft_run
    original = load_file(tiny_model_dir / "model.safetensors")
    state = ref["state"]
    adapters = {k: v for k, v in state.items() if ".lora_" in k}
    # 3 layers x 7 linears, an A and a B each; layer 1 (0-based 0) has none.
    assert len(adapters) == 42 and not any(k.startswith("model.layers.0.") for k in adapters)
    # B starts at zero in peft: every B moved, so every adapter trained.
    assert all(v.abs().max() > 0 for k, v in adapters.items() if ".lora_B." in k)
    base = {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
    compared = [k for k in base if k in original]
    assert len(compared) == len(original)
    for key in compared:
        assert torch.equal(base[key], original[key]), key  # bitwise: frozen, no optimizer state


def test_merged_export_and_adapter_give_the_engine_logits(sft_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, ref = sft_run
    export = run / "export"
    ids, mask, content = ref["input_ids"], ref["attention_mask"], _content(ref)
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    assert not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        logits = merged(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[content], ref["logits"][content], rtol=1e-5, atol=1e-5)

    adapter = export / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_model_dir)
    assert config["r"] == 4 and config["layers_to_transform"] == [1, 2, 3]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[content], ref["logits"][content], rtol=1e-5, atol=1e-5)


def test_shifcon_with_lora_keeps_the_shift(tmp_path, tiny_model_dir):
    """ShifCon's hooks sit on the adapted decoder layers: the engine's logits are the export's
    with the shift on, and differ from the export's without it."""
    from methods.shifcon.infer import ShiftedLM

    proc, run = train(
        tmp_path, tiny_model_dir, "lora_shifcon", *FAST, f"method={json.dumps(SHIFCON)}", lora=LORA
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all("loss_mcl" in m for m in summary(run)["method_metrics"])
    ref = lora_session(run, tmp_path)
    lm = ShiftedLM.from_export(run / "export")
    ids, mask, content = ref["input_ids"], ref["attention_mask"], _content(ref)
    shifted = lm.logits(ids, mask, langs=ref["langs"])
    torch.testing.assert_close(shifted[content], ref["logits"][content], rtol=1e-5, atol=1e-5)
    plain = lm.logits(ids, mask, langs=None)
    assert not torch.allclose(plain[content], shifted[content])
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_two_process_zero3_lora_shifcon_learns(tmp_path, tiny_model_dir):
    proc, run = train(
        tmp_path,
        tiny_model_dir,
        "lora_dp2",
        "cluster.workers_per_node=2",
        "training.lr=1e-2",
        "training.steps=8",
        f"method={json.dumps(SHIFCON)}",
        lora=LORA,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = summary(run)
    assert s["world_size"] == 2
    lm = [m["loss_lm"] for m in s["method_metrics"]]
    assert sum(lm[-2:]) < sum(lm[:2]), lm
    assert sum(s["losses"][-2:]) < sum(s["losses"][:2]), s["losses"]
    for lang, before in s["eval_before"].items():
        assert s["eval_after"][lang] < before, lang


def test_resume_of_a_lora_run_is_bitwise_identical(tmp_path, tiny_model_dir, sft_run):
    """The straight run's step-2 checkpoint (adapters, their optimizer state, the data
    position), resumed in a run dir of its own: steps 3-4 give the straight run's losses and
    weights bit for bit. (A crash mid-run before the resume: test_training and the Ray test.)"""
    straight, _ = sft_run
    run = tmp_path / "runs" / "lora_sft"
    shutil.copytree(straight / "checkpoints", run / "checkpoints")
    shutil.rmtree(run / "checkpoints" / "step_00000004")
    assert CheckpointStore(run / "checkpoints", 2).latest() == "step_00000002"
    proc, run = train(tmp_path, tiny_model_dir, "lora_sft", *SFT_SETS, lora=SFT_LORA)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert summary(run)["losses"] == summary(straight)["losses"]
    for name in ("model.safetensors", "adapter/adapter_model.safetensors"):
        ours, ref = load_file(run / "export" / name), load_file(straight / "export" / name)
        assert ours.keys() == ref.keys()
        for key in ref:
            assert torch.equal(ours[key], ref[key]), (name, key)
