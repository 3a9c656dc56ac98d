"""The one training loop: engine- and method-agnostic, resumable, tracked.

Runs in every worker process. Rank 0 alone prints, logs to MLflow and moves checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from config.errors import CheckpointWriteFailed, TrainingDiverged
from config.recipe import dump_recipe
from config.schema import Recipe
from data.batching import DataPosition, GlobalBatchStream, rank_micro_batches
from data.formatting import Batch, Example, collate, num_label_tokens
from data.pipeline import RunData, build_run_data
from eval.engine import check_benchmarks, run_benchmarks
from launcher.checkpoints import CheckpointStore, step_tag
from launcher.serving import log_export
from launcher.tracking import Tracker, flatten, layer_curves
from launcher.universal import plan_resume
from methods.registry import build_method
from model.backbone import load_tokenizer, resolve_backbone
from parallel.distributed import (
    DistContext,
    all_reduce_sum_,
    barrier,
    init_distributed,
    prepare_accelerator_env,
    resolve_device,
)
from parallel.safe_load import check_checkpoint, enforce_weights_only


def lr_at(step: int, recipe: Recipe) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the decay."""
    t = recipe.training
    if t.warmup_steps and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    floor = t.lr * t.min_lr_ratio
    if t.schedule == "linear":
        return floor + (t.lr - floor) * (1.0 - progress)
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    """Everything besides weights and optimizer that a resume needs (the client state)."""

    step: int = 0
    position: DataPosition = field(default_factory=DataPosition)
    eval_before: dict[str, float] | None = None
    losses: list[float] = field(default_factory=list)
    method_metrics: list[dict[str, float]] = field(default_factory=list)

    def to_client(self, method_state: dict[str, Any]) -> dict[str, Any]:
        return {
            "polyshift": {
                "step": self.step,
                "position": asdict(self.position),
                "eval_before": self.eval_before,
                "losses": self.losses,
                "method_metrics": self.method_metrics,
            },
            "rng": rng_state(),
            "method": method_state,
        }

    @classmethod
    def from_client(cls, client: dict[str, Any]) -> TrainState:
        s = client["polyshift"]
        return cls(
            s["step"],
            DataPosition(**s["position"]),
            s["eval_before"],
            list(s["losses"]),
            list(s["method_metrics"]),
        )


def evaluate(
    engine, examples: Sequence[Example], data: RunData, batch_size: int, ctx: DistContext, pad_id
) -> dict[str, float]:
    """Per-language token-mean loss on the held-out split, spread over the ranks.

    Under ZeRO-3 a forward is a collective, so every rank runs the same number of batches: ranks
    short of work repeat a batch with zero weight.
    """
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    batches = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    # Shards over data-parallel ranks; the ranks of one model-parallel group see the same batch.
    rank, world = engine.dp_rank, engine.dp_size
    mine = batches[rank::world]
    rounds = math.ceil(len(batches) / world)
    k = len(data.languages)
    sums = torch.zeros(2 * k, dtype=torch.float64)
    for r in range(rounds):
        idx, weight = (mine[r], 1.0) if r < len(mine) else (batches[0], 0.0)
        batch = collate([examples[i] for i in idx], pad_id, data.languages)
        loss_sum, count = engine.eval_losses(batch)
        lang = batch.lang_ids
        sums[:k].index_add_(0, lang, loss_sum.double().cpu() * weight)
        sums[k:].index_add_(0, lang, count.double().cpu() * weight)
    all_reduce_sum_(sums)  # counts each DP shard once per model-parallel rank: ratios hold
    return {
        lang: (sums[i] / sums[k + i]).item()
        for i, lang in enumerate(data.languages)
        if sums[k + i] > 0
    }


def format_eval_table(before: dict[str, float] | None, after: dict[str, float]) -> str:
    if before is None:
        rows = ["| language | loss | ppl |", "|---|---|---|"]
        rows += [f"| {lang} | {v:.4f} | {math.exp(v):.2f} |" for lang, v in after.items()]
        return "\n".join(rows)
    rows = ["| language | loss before | loss after | change | ppl after |", "|---|---|---|---|---|"]
    for lang, loss in after.items():
        b = before.get(lang) if before else None
        change = f"{loss - b:+.4f}" if b is not None else "n/a"
        b_text = f"{b:.4f}" if b is not None else "n/a"
        rows.append(f"| {lang} | {b_text} | {loss:.4f} | {change} | {math.exp(loss):.2f} |")
    return "\n".join(rows)


def _log(ctx: DistContext, message: str) -> None:
    if ctx.is_rank0:
        print(message, flush=True)


def maybe_fail(point: str, step: int) -> None:
    """Fault injection for crash tests: POLYSHIFT_FAIL_AT=<point>:<step>[:<rank>]."""
    spec = os.environ.get("POLYSHIFT_FAIL_AT")
    if not spec:
        return
    want_point, want_step, *rank = spec.split(":")
    this_rank = int(os.environ.get("RANK", "0"))
    if (want_point, int(want_step)) == (point, step) and (not rank or int(rank[0]) == this_rank):
        print(f"injected failure at {point} step {step}", file=sys.stderr, flush=True)
        os._exit(17)


def build_engine(recipe: Recipe, ctx: DistContext, backbone, method):
    if recipe.parallel.engine == "deepspeed":
        from parallel.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(recipe, ctx, backbone, method)
    if recipe.parallel.engine == "megatron":
        from parallel.megatron_engine import MegatronEngine

        return MegatronEngine(recipe, ctx, backbone, method)
    raise ValueError(f"parallel.engine: {recipe.parallel.engine!r} is not available")


def save_failure(exc: BaseException, where: Path, store: CheckpointStore) -> CheckpointWriteFailed:
    """An OS error during a save as one message: the path, the cause, what is still safe.

    torch's writer reports a full disk as ``basic_ios::clear: iostream error``; the free space
    of the target says what happened.
    """
    import errno
    import shutil

    cause = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        cause = "No space left on device"
    else:
        try:
            free = shutil.disk_usage(where if where.exists() else store.root.parent).free
        except OSError:
            free = None
        if free is not None and free < 64 * 2**20:
            cause = f"No space left on device ({free // 2**20} MiB free; {cause})"
    latest = store.latest()
    safe = (
        f"the previous checkpoint {store.root / latest} is intact"
        if latest
        else "no earlier checkpoint"
    )
    return CheckpointWriteFailed(f"saving a checkpoint into {where} failed: {cause}; {safe}")


def _save(engine, store: CheckpointStore, state: TrainState, ctx: DistContext, tracker) -> None:
    tag = step_tag(state.step)
    if ctx.is_rank0:
        store.prepare()
    barrier()
    try:
        engine.save(store.staging, tag, state.to_client(engine.method_state()))
    except (OSError, RuntimeError) as exc:
        raise save_failure(exc, store.staging / tag, store) from exc
    barrier()
    maybe_fail("checkpoint_commit", state.step)
    if ctx.is_rank0:
        final = store.commit(tag, {"step": state.step, "world_size": ctx.world_size})
        tracker.set_tag("checkpoint.latest", str(final.resolve()))
    barrier()


@dataclass
class Session:
    """A built, restored training job in this process: what the loop (and tests) work on."""

    recipe: Recipe
    run_dir: Path
    ctx: DistContext
    tokenizer: Any
    data: RunData
    engine: Any
    store: CheckpointStore
    state: TrainState


def open_session(recipe: Recipe, run_dir: Path) -> Session:
    """Join the process group, build data, method and engine, and restore the latest checkpoint."""
    enforce_weights_only()  # a run directory is input: checkpoints load as data, never as code
    device = resolve_device(recipe.cluster.device)
    prepare_accelerator_env(device)
    ctx = init_distributed(device)
    if ctx.world_size != recipe.cluster.world_size:
        raise RuntimeError(
            f"cluster: the recipe asks for {recipe.cluster.world_size} workers "
            f"but {ctx.world_size} processes were started"
        )
    if device == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(recipe.training.seed)

    backbone = resolve_backbone(recipe.model)
    tokenizer = load_tokenizer(backbone, recipe.model)
    data = build_run_data(recipe.data, tokenizer)
    _log(ctx, f"data: {json.dumps(data.summary(), ensure_ascii=False)}")
    method = build_method(recipe, data, tokenizer)
    store = CheckpointStore(run_dir / "checkpoints", recipe.checkpoint.keep_last)
    if ctx.is_rank0:
        for path in store.discard_leftovers():
            _log(ctx, f"removed {path} (left by an interrupted save)")
    barrier()
    tag = store.latest() if recipe.checkpoint.resume else None
    if tag is not None:
        check_checkpoint(store.root / tag)
    # Written by another world size: converted once to a universal checkpoint, loaded from there.
    resume = plan_resume(recipe, store.root, tag, ctx)
    engine = build_engine(resume.recipe, ctx, backbone, method)
    local, total = engine.param_counts()
    _log(ctx, f"model: {total:,} parameters; rank 0 stores {local:,}")

    state = TrainState()
    if tag is not None:
        client = engine.load(resume.root, resume.tag)
        state = TrainState.from_client(client)
        set_rng_state(client["rng"])
        engine.restore_method(client.get("method", {}))
        _log(ctx, f"resumed from {store.root / tag} at step {state.step}{resume.note}")
    else:
        engine.prepare_method(data.train, recipe.training.eval_batch_size)
    return Session(recipe, run_dir, ctx, tokenizer, data, engine, store, state)


def run_training(recipe: Recipe, run_dir: Path) -> dict[str, Any]:
    """Train (or resume) the recipe in this process; returns the final summary on every rank."""
    session = open_session(recipe, run_dir)
    run_info = run_dir / "run.json"
    known_run = json.loads(run_info.read_text())["mlflow_run_id"] if run_info.is_file() else None
    tracker = Tracker(
        enabled=recipe.tracking.enabled,
        is_rank0=session.ctx.is_rank0,
        tracking_uri=recipe.tracking.tracking_uri,
        experiment=recipe.tracking.experiment,
        run_name=recipe.tracking.run_name or recipe.name,
        run_id=known_run,
        log_system_metrics=recipe.tracking.log_system_metrics,
        registered_model_name=recipe.tracking.registered_model_name,
        workdir=Path.cwd(),
    )
    with tracker:
        run_id = tracker.start(
            params=flatten(recipe.model_dump(mode="json")),
            tags={"polyshift.method": recipe.method.name, "polyshift.run_dir": str(run_dir)},
        )
        if session.ctx.is_rank0 and run_id and known_run is None:
            run_info.write_text(json.dumps({"mlflow_run_id": run_id}))
        method_tags = session.engine.method.run_tags()  # decisions taken at start-up
        tracker.log_params(method_tags)
        for key, value in method_tags.items():
            tracker.set_tag(key, value)
        if known_run is None:
            tracker.log_text(dump_recipe(recipe), "recipe.yaml")
            tracker.log_dict(session.engine.config, "engine_config.json")
            tracker.log_dict(session.data.summary(), "data_summary.json")
        summary = train(session, tracker)
    if session.ctx.is_rank0:
        (run_dir / "summary.json").write_text(strict_json(summary))
    return summary


def check_finite(result, step: int, store: CheckpointStore) -> None:
    """Stop at the first non-finite loss or gradient norm: nothing after it is saved or exported.

    The loss and the norm are reduced over all ranks, so every rank takes the same decision.
    """
    values = {"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics}
    bad = {k: v for k, v in values.items() if v is not None and not math.isfinite(v)}
    if not bad:
        return
    latest = store.latest()
    resume = f"the last good checkpoint is {store.root / latest}" if latest else "no checkpoint"
    found = ", ".join(f"{k}={v}" for k, v in bad.items())
    raise TrainingDiverged(
        f"training diverged at step {step}: {found}; {resume} (lower training.lr, check the "
        "data, or resume from that checkpoint with other settings)"
    )


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def strict_json(obj: Any) -> str:
    """JSON that every parser reads: NaN and infinities become null."""
    return json.dumps(_finite_or_none(obj), indent=2, allow_nan=False)


def micro_batches(session: Session, global_batch: Sequence[int]) -> list[Batch]:
    """This rank's micro-batches of a global batch, each carrying the global token normaliser."""
    t, engine, data = session.recipe.training, session.engine, session.data
    label_tokens = sum(num_label_tokens(data.train[i]) for i in global_batch)
    dp_rank, dp_size = engine.dp_rank, engine.dp_size
    per_rank = rank_micro_batches(global_batch, t.micro_batch_size, dp_rank, dp_size)
    normalizer = max(1, label_tokens) / (dp_size * len(per_rank))
    pad_id = session.tokenizer.pad_token_id
    return [
        replace(
            collate([data.train[i] for i in mb], pad_id, data.languages),
            token_normalizer=normalizer,
        )
        for mb in per_rank
    ]


def train(session: Session, tracker: Tracker) -> dict[str, Any]:
    recipe, run_dir, ctx, engine = session.recipe, session.run_dir, session.ctx, session.engine
    data, store, state, tokenizer = session.data, session.store, session.state, session.tokenizer
    t = recipe.training
    pad_id = tokenizer.pad_token_id

    def run_eval(step: int) -> dict[str, float]:
        result = evaluate(engine, data.eval, data, t.eval_batch_size, ctx, pad_id)
        tracker.log_metrics({f"eval/loss/{lang}": v for lang, v in result.items()}, step)
        if result:
            tracker.log_metrics({"eval/loss_mean": sum(result.values()) / len(result)}, step)
        tracker.log_metrics(engine.method.metrics(), step)
        return result

    check_benchmarks(session)  # the eval: section's files, read before any training
    if state.eval_before is None:
        state.eval_before = run_eval(0)
        _log(ctx, "held-out loss before training:\n" + format_eval_table(None, state.eval_before))

    stream = GlobalBatchStream(
        [len(e) for e in data.train],
        t.global_batch_size,
        t.seed,
        recipe.data.batching == "bucket",
        state.position,
    )
    every = recipe.checkpoint.every
    bar = tqdm(
        total=t.steps,
        initial=state.step,
        desc="train",
        disable=not ctx.is_rank0,
        dynamic_ncols=True,
    )
    last_saved = state.step if state.step else -1
    while state.step < t.steps:
        global_batch = stream.next()
        micro = micro_batches(session, global_batch)
        lr = lr_at(state.step, recipe)
        start = time.perf_counter()
        result = engine.train_step(micro, lr)
        elapsed = time.perf_counter() - start
        check_finite(result, state.step + 1, store)
        state.step += 1
        state.losses.append(result.loss)
        state.method_metrics.append(result.metrics)
        tokens = sum(len(data.train[i]) for i in global_batch)
        maybe_fail("train_step", state.step)
        if state.step % t.log_every == 0 or state.step == t.steps:
            metrics = {
                "train/loss": result.loss,
                "train/lr": lr,
                "train/step_time_s": elapsed,
                "train/tokens_per_s": tokens / elapsed,
                **{f"train/{k}": v for k, v in result.metrics.items()},
            }
            if result.grad_norm is not None:
                metrics["train/grad_norm"] = result.grad_norm
            tracker.log_metrics(metrics, state.step)
        bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        if t.eval_every and state.step % t.eval_every == 0 and state.step < t.steps:
            run_eval(state.step)
        if every and state.step % every == 0:
            _save(engine, store, state, ctx, tracker)
            last_saved = state.step
    bar.close()
    tracker.log_layer_metrics(layer_curves(state.method_metrics))
    if last_saved != state.step:
        _save(engine, store, state, ctx, tracker)

    after = run_eval(state.step)
    table = format_eval_table(state.eval_before, after)
    _log(ctx, "held-out loss (per language):\n" + table)
    tracker.log_text(table + "\n", "eval/heldout_loss.md")
    tracker.log_dict({"before": state.eval_before, "after": after}, "eval/heldout_loss.json")

    export_dir = None
    if recipe.checkpoint.export:
        export_dir = run_dir / "export"
        export_model(engine, tokenizer, recipe, data.languages, export_dir, ctx)
        for path in engine.method.artifacts(export_dir):
            tracker.log_artifact(path, f"method/{recipe.method.name}")
    benchmarks = run_benchmarks(session, tracker, state.step)  # recipe eval:, on the engine
    if export_dir is not None and recipe.tracking.log_model:
        # After every final metric, at the final step: the LoggedModel links that step's
        # metrics (held-out loss, benchmarks, last train step), not the run's first.
        log_export(tracker, export_dir, state.step)
    counts = torch.tensor(engine.param_counts(), dtype=torch.long)
    shards = [torch.zeros_like(counts) for _ in range(ctx.world_size)]
    if torch.distributed.is_initialized():
        torch.distributed.all_gather(shards, counts)
    else:
        shards = [counts]
    return {
        "steps": state.step,
        "world_size": ctx.world_size,
        "param_total": int(counts[1]),
        "param_shards": [int(c[0]) for c in shards],
        "losses": state.losses,
        "method_metrics": state.method_metrics,
        "eval_before": state.eval_before,
        "eval_after": after,
        "benchmarks": benchmarks,
        "export_dir": str(export_dir) if export_dir else None,
        "mlflow_run_id": tracker.run_id,
    }


def export_model(engine, tokenizer, recipe: Recipe, languages, directory: Path, ctx) -> None:
    """A Hugging Face directory plus the method's own files, swapped in atomically."""
    import shutil

    staging = directory.with_name(directory.name + ".tmp")
    if ctx.is_rank0:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()
    engine.export(staging)
    if ctx.is_rank0:
        tokenizer.save_pretrained(staging)
        engine.method.export(staging)
        meta = {"method": recipe.model_dump(mode="json")["method"], "languages": languages}
        (staging / "polyshift.json").write_text(json.dumps(meta, indent=2))
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(staging, directory)
    barrier()
