"""Megatron checks in one pair of gloo processes (process start-up dominates on CPU).

``python -m torch.distributed.run --nproc_per_node 2 -m tests.helpers.megatron_worker SPEC.json OUT``

SPEC is a list of jobs, run in order in the same processes (2 or 4), each a fresh megatron layout:
``{"name", "recipe", "train": bool, "steps": bool, "logits": bool, "generate": bool,
"export_untrained": bool}``
(``generate``: cached greedy decoding recorded by `tests/helpers/engine_generation.py`). Training goes
through `run_training`, the function every launcher's workers run; logits are taken from a
session re-opened on the run directory (so they come from the distributed checkpoint).
``steps``: only the engine's optimizer steps on the launcher's batches (no evaluation, no
checkpoint), recording each step's loss, metrics, gradient norm and the vocabulary width of
the logits the training loss was handed in ``steps.json`` and the
weights after the last step in ``export/``: what layout parity tests compare, at a fraction of
a full run's cost.
``export_method``: with ``steps``, the export also holds the method's files (the loop's
`export_model`); ``steps`` also runs a DeepSpeed recipe (one process: a reference).
``exit_like_launcher``: after training, leave as `launcher/worker.py` does (no collective after
`run_training`), so the job must be the last; ``slow_upload_s``: rank 0's MLflow model upload
first sleeps that long. With ``GROUP_TIMEOUT_S`` (third argument) the gloo group gets that
collective timeout instead of the engine's 600 s.
Everything a test asserts on is written under OUT/<name>/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from config.recipe import dump_recipe, validate_recipe
from data.formatting import collate
from launcher.loop import open_session, run_training


def _fixed_batch(session):
    """Two held-out samples of every language: the per-language shift shows in the logits."""
    data = session.data
    examples = [e for lang in data.languages for e in data.eval if e.lang == lang]
    examples = [e for i, e in enumerate(examples) if i % 2 == 0][:6]
    return collate(examples, session.tokenizer.pad_token_id, data.languages)


def _close() -> None:
    from megatron.core import parallel_state as ps

    dist.barrier()
    ps.destroy_model_parallel()


def run_steps(recipe, run_dir: Path, export_method: bool = False) -> None:
    """The training loop's batches and learning rates through `train_step`, nothing else
    (``export_method``: the export also holds the method's files, as the loop writes them)."""
    from data.batching import GlobalBatchStream
    from launcher.loop import export_model, lr_at, micro_batches

    session = open_session(recipe, run_dir)
    t = recipe.training
    stream = GlobalBatchStream(
        [len(e) for e in session.data.train],
        t.global_batch_size,
        t.seed,
        recipe.data.batching == "bucket",
        session.state.position,
    )
    engine, widths = session.engine, []
    real_loss = getattr(engine, "_train_loss", None)  # megatron only (a DeepSpeed reference)

    def train_loss(feed, logits):  # what the training loss is handed, per micro-batch
        widths.append(logits.shape[-1])
        return real_loss(feed, logits)

    if real_loss is not None:
        engine._train_loss = train_loss
    steps = []
    for step in range(t.steps):
        result = engine.train_step(micro_batches(session, stream.next()), lr_at(step, recipe))
        steps.append({"loss": result.loss, "grad_norm": result.grad_norm, **result.metrics})
        steps[-1]["loss_logits_width"] = max(widths, default=None)
    if export_method:
        s = session
        export_model(engine, s.tokenizer, recipe, s.data.languages, run_dir / "export", s.ctx)
    else:
        session.engine.export(run_dir / "export")
    if dist.get_rank() == 0:
        (run_dir / "steps.json").write_text(json.dumps(steps))
    _close()


def _slow_uploads(seconds: float) -> None:
    """The real uploads, each started `seconds` late (what a 70B export costs in time)."""
    import time

    from launcher.tracking import Tracker

    for name in ("_log_transformers", "_log_pyfunc", "_log_checkpoint_files"):
        real = getattr(Tracker, name)

        def slowed(self, *args, _real=real, **kwargs):
            time.sleep(seconds)
            return _real(self, *args, **kwargs)

        setattr(Tracker, name, slowed)


def run_job(job: dict, out: Path) -> None:
    from methods.shifcon.megatron import ShifConLayer

    recipe = validate_recipe(job["recipe"], job["name"])
    run_dir = out / job["name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    if job.get("slow_upload_s"):
        _slow_uploads(job["slow_upload_s"])
    if job.get("exit_like_launcher"):
        from megatron.core import parallel_state as ps

        run_training(recipe, run_dir)
        ps.destroy_model_parallel()  # local; the process group is left as the launcher leaves it
        return
    if job.get("train"):
        for steps in job.get("stages", [recipe.training.steps]):
            staged = recipe.model_copy(deep=True)
            staged.training.steps = steps
            run_training(staged, run_dir)  # writes run_dir/summary.json
            _close()
    if job.get("steps"):
        run_steps(recipe, run_dir, export_method=job.get("export_method", False))
    if not (job.get("logits") or job.get("export_untrained") or job.get("generate")):
        return
    session = open_session(recipe, run_dir)
    engine = session.engine
    rank = dist.get_rank()
    shift_layers = sorted(
        m.layer_number for m in engine.model.modules() if isinstance(m, ShifConLayer)
    )
    placement = [None] * dist.get_world_size()
    dist.all_gather_object(placement, {"pp_rank": engine.pp_rank, "shift_layers": shift_layers})
    if job.get("logits"):
        batch = _fixed_batch(session)
        logits = engine.forward_logits(batch)
        hidden = engine.hidden_states(batch)
        if rank == 0:
            torch.save(
                {
                    "input_ids": batch.input_ids,
                    "attention_mask": batch.attention_mask,
                    "langs": [session.data.languages[i] for i in batch.lang_ids.tolist()],
                    "logits": logits,
                    "hidden_states": hidden,
                    "placement": placement,
                },
                run_dir / "engine_logits.pt",
            )
    if job.get("generate"):  # cached generation across the stages (every rank decodes)
        from tests.helpers.engine_generation import record

        generated = record(session)
        if rank == 0:
            torch.save(generated, run_dir / "engine_generation.pt")
    if job.get("export_untrained"):
        engine.export(run_dir / "export_untrained")
    _close()


def main(spec_path: str, out: str, group_timeout_s: str | None = None) -> None:
    torch.set_num_threads(1)
    if group_timeout_s is not None:
        from datetime import timedelta

        dist.init_process_group("gloo", timeout=timedelta(seconds=float(group_timeout_s)))
    jobs = json.loads(Path(spec_path).read_text())
    for job in jobs:
        run_job(job, Path(out))
    if not jobs[-1].get("exit_like_launcher"):
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
