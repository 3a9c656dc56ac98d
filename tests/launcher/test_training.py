"""End-to-end training on a tiny random Llama: ZeRO-3 on 1 and 2 processes, resume, export."""

from __future__ import annotations

import json

import pytest
import torch

from launcher.checkpoints import CheckpointStore
from tests.helpers.engine_logits import engine_logits
from tests.helpers.runs import summary, train, weights

pytestmark = pytest.mark.slow  # every test here runs the launcher in fresh processes


DP2_STEPS = 8
TRACKING = {
    "enabled": True,
    "experiment": "training-e2e",
    "registered_model_name": "tiny-e2e",
}


@pytest.fixture(scope="module")
def dp2_run(tmp_path_factory, tiny_model_dir, mlflow_server):
    """One 2-worker ZeRO-3 run, tracked: the partitioning and the tracking tests both read it
    (a 2-worker launch is mostly process start-up)."""
    tmp = tmp_path_factory.mktemp("dp2")
    env = {"MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"}
    proc, run = train(
        tmp,
        tiny_model_dir,
        "dp2",
        "cluster.workers_per_node=2",
        f"training.steps={DP2_STEPS}",
        "checkpoint.every=4",
        env=env,
        tracking={**TRACKING, "tracking_uri": mlflow_server},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_two_process_zero3_learns_and_partitions(dp2_run):
    s = summary(dp2_run)
    assert s["world_size"] == 2
    # ZeRO-3: each rank stores a shard (about half, padded), never the whole model.
    total, shards = s["param_total"], s["param_shards"]
    assert len(shards) == 2 and all(0 < n < 0.6 * total for n in shards)
    assert sum(shards) >= total
    losses = s["losses"]
    assert sum(losses[-2:]) < sum(losses[:2])
    for lang, before in s["eval_before"].items():
        assert s["eval_after"][lang] < before, lang


# The uninterrupted reference: micro-batch 4 = the global batch, so no accumulation; the
# accumulation test compares 4 micro-batches of 1 against it.
STRAIGHT = ("training.steps=6", "training.micro_batch_size=4")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("straight")
    proc, run = train(tmp, tiny_model_dir, "straight", *STRAIGHT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_crash_in_save_then_in_step_resumes_bitwise_identical(
    tmp_path, tiny_model_dir, straight_run
):
    """One run dir, two crashes (each launch costs a fresh interpreter): a crash while saving
    step 4 keeps step 2 and leaves step 4 in staging; the resume from 2 crashes at step 5 after
    saving 4; the resume from 4 finishes bitwise equal to the uninterrupted run."""
    sets = (*STRAIGHT, "checkpoint.every=2")
    env = {"POLYSHIFT_FAIL_AT": "checkpoint_commit:4"}
    proc, run = train(tmp_path, tiny_model_dir, "crashes", *sets, env=env)
    assert proc.returncode != 0 and "injected failure at checkpoint_commit step 4" in proc.stderr
    store = CheckpointStore(run / "checkpoints", 2)
    # Step 4's shards were fully written to staging, but never became a checkpoint.
    assert (store.staging / "step_00000004").is_dir()
    assert store.latest() == "step_00000002"

    env = {"POLYSHIFT_FAIL_AT": "train_step:5"}
    proc, run = train(tmp_path, tiny_model_dir, "crashes", *sets, env=env)
    assert proc.returncode != 0 and "injected failure at train_step step 5" in proc.stderr
    assert "resumed from" in proc.stdout and "at step 2" in proc.stdout
    assert store.latest() == "step_00000004"

    proc, run = train(tmp_path, tiny_model_dir, "crashes", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    assert summary(run)["losses"] == summary(straight_run)["losses"]
    ours, ref = weights(run), weights(straight_run)
    assert ours.keys() == ref.keys()
    for key in ref:
        assert torch.equal(ours[key], ref[key]), key
    assert store.complete_tags() == ["step_00000004", "step_00000006"]  # keep_last=2
    assert not store.staging.exists()


def test_export_loads_in_plain_transformers_with_engine_logits(tmp_path, straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = engine_logits(straight_run, tmp_path)
    export = straight_run / "export"
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    AutoTokenizer.from_pretrained(export)  # the tokenizer travels with the export
    with torch.no_grad():
        logits = model(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits
    mask = ref["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], ref["logits"][mask], rtol=1e-5, atol=1e-5)
    meta = json.loads((export / "polyshift.json").read_text())
    assert meta["method"]["name"] == "sft" and meta["languages"][0] == "en"


def test_accumulation_and_checkpointing_match_one_big_batch(tmp_path, tiny_model_dir, straight_run):
    """Token-normalised accumulation: micro 1 x 4, with activation checkpointing, equals the
    straight run's micro 4 x 1 up to float rounding."""
    sets = (*STRAIGHT, "training.micro_batch_size=1", "model.gradient_checkpointing=true")
    proc, run = train(tmp_path, tiny_model_dir, "accum_ckpt", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary(straight_run), summary(run)
    assert a["losses"] == pytest.approx(b["losses"], rel=1e-5)
    wa, wb = weights(straight_run), weights(run)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5)


def test_two_worker_run_is_tracked_from_rank0_only(dp2_run, mlflow_server):
    from mlflow import MlflowClient

    run = dp2_run
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("training-e2e")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # one run for the job: rank 1 never opened its own
    mlrun = runs[0]
    assert mlrun.info.run_id == json.loads((run / "run.json").read_text())["mlflow_run_id"]
    params = mlrun.data.params
    assert params["training.steps"] == str(DP2_STEPS) and params["cluster.workers_per_node"] == "2"
    assert params["method.name"] == "sft"
    history = client.get_metric_history(mlrun.info.run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, DP2_STEPS + 1))  # each step logged once
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/step_time_s",
        "eval/loss/en",
        "eval/loss/sw",
    ):
        assert key in mlrun.data.metrics, key
    assert any(key.startswith("system/") for key in mlrun.data.metrics)
    assert mlrun.data.tags["checkpoint.latest"].endswith(f"step_{DP2_STEPS:08d}")
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert {"recipe.yaml", "engine_config.json", "eval"} <= artifacts
    versions = client.search_model_versions("name='tiny-e2e'")
    assert len(versions) == 1 and versions[0].run_id == mlrun.info.run_id
