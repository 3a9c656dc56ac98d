"""Side-by-side quality benchmark: plain multilingual SFT vs ShifCon (and variants), measured.

    python -m bench.quality [--data-dir ../shared/data] [--seeds 0,1] [--steps 40]
        [--runs "sft;shifcon;shifcon:method.beta=0"] [--quick] [--out runs/quality]

From one backbone, the same data, steps and seed, every run trains through the project's own
entry (`launcher/run.py` on a generated recipe: the one loop, the one engine, MLflow tracking,
all runs in one experiment). Data: the shared GSM8K questions in every language with the
English worked answers (`data/gsm8k_shared.py`), split by question hash; no run trains on a
held-out question. Then every export is evaluated on held-out questions:

- answer NLL per language: per-token NLL of the English worked answer given the question in
  language X (chat prompt; ShifCon shifted as X);
- cross-lingual gap: NLL(X) - NLL(en) on the same questions; the mean over non-English
  languages is the headline number (lower is better);
- bitext retrieval inside the band: X question -> its English question among all held-out
  ones, by cosine of the centred content-pooled H_l, mean over the band layers [f, b);
- detection accuracy (ShifCon runs): the export's linear detector and centroids, min over
  languages;
- the MCL curve (first and last `train/loss_mcl`, and ln of the contrastive batch).

One table (stdout + `<out>/quality.md`), one plot (`<out>/quality.png`), every run's metrics in
MLflow (`quality/...` in the training run itself). `--quick` uses a tiny random model (tests).
A run spec is `method[:key=value,...]` with dotted recipe keys, e.g. `shifcon:method.tau=1.0`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LANGS = "en,de,es,fr,ja,ru,sw,zh"
EXPERIMENT = "polyshift-quality"


def base_recipe(args, out: Path) -> dict[str, Any]:
    """The shared recipe: everything but the method section and the seed."""
    data = out / "data"
    quick = args.quick
    return {
        "output_dir": str(out / "runs"),
        "model": {"backbone": args.backbone},
        "data": {
            "train": [{"path": str(data / "train.jsonl")}],
            "eval": [{"path": str(data / "loop_eval.jsonl")}],
            "languages": args.languages.split(","),
            "dominant_language": "en",
            "max_length": 512 if quick else args.max_length,
            "eval_samples_per_language": 2 if quick else 4,
        },
        "training": {
            "steps": args.steps,
            "global_batch_size": 4 if quick else args.batch_size,
            "micro_batch_size": 4 if quick else args.batch_size,
            "lr": args.lr,
            "warmup_steps": min(5, args.steps // 4),
            "schedule": "cosine",
            "eval_batch_size": 8,
        },
        "parallel": {"engine": "deepspeed", "zero_stage": args.zero_stage},
        "cluster": {"nodes": 1, "workers_per_node": 1, "device": "cpu"},
        "tracking": {
            "enabled": True,
            "tracking_uri": f"sqlite:///{out / 'mlflow.db'}",
            "experiment": EXPERIMENT,
            "log_model": False,  # the exports stay in the run dirs; MLflow holds the metrics
            "log_system_metrics": False,
        },
        "checkpoint": {"every": 0, "keep_last": 1, "resume": False, "export": True},
    }


def method_section(name: str, args, out: Path) -> dict[str, Any]:
    if name == "sft":
        return {"name": "sft"}
    if name != "shifcon":
        raise SystemExit(f"error: unknown method {name!r} in --runs (sft, shifcon)")
    return {
        "name": "shifcon",
        "band": [int(x) for x in args.band.split(",")],
        "vector_samples": 8 if args.quick else args.vector_samples,
        "mcl_batch_size": 4 if args.quick else 8,
        "pairs": {"path": str(out / "data" / "pairs.jsonl"), "max_length": 128},
    }


def parse_run(spec: str) -> tuple[str, str, dict[str, Any]]:
    """`method[:a.b=v,c=w]` -> (label, method, overrides); values are YAML scalars."""
    method, _, rest = spec.strip().partition(":")
    overrides = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"error: --runs: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    label = spec.strip().replace(":", "+").replace("method.", "").replace(",", "+")
    return label, method, overrides


def _set(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def write_data(args, out: Path, languages: list[str]) -> tuple[list, list]:
    """Train rows, contrastive pairs, a small loop eval set, from the train/held-out split."""
    from data.gsm8k_shared import load_items, pair_rows, training_rows

    data_dir = Path(args.data_dir)
    train = load_items(data_dir, languages, split="train")[: args.train_items]
    held = load_items(data_dir, languages, split="heldout")[: args.heldout_items]
    if not train or not held:
        raise SystemExit(f"error: {data_dir}: no train or held-out items for {languages}")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, rows: list[dict]) -> None:
        text = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
        (folder / name).write_text(text, encoding="utf-8")

    dump("train.jsonl", training_rows(train, languages))
    dump("pairs.jsonl", pair_rows(train, languages))
    dump("loop_eval.jsonl", training_rows(held[:4], languages))
    return train, held


def train_run(recipe: dict, out: Path, name: str, reuse: bool = False) -> Path:
    """One run through `launcher/run.py`; returns its run dir (export inside)."""
    recipe_path = out / "recipes" / f"{name}.yaml"
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    run_dir = Path(recipe["output_dir"]) / name
    log = out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    start = time.time()
    if reuse and (run_dir / "summary.json").is_file() and (run_dir / "export").is_dir():
        print(f"  reusing {run_dir} (trained before)", flush=True)
        return run_dir
    with log.open("w") as fh:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "launcher" / "run.py"), str(recipe_path)],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=env,
        )
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise SystemExit(
            f"error: run {name} failed (exit {proc.returncode}); {log}:\n" + "\n".join(tail)
        )
    print(f"  trained {name} in {time.time() - start:.0f} s ({log})", flush=True)
    return run_dir


# -- evaluation ------------------------------------------------------------------------------


def _load_export(export: Path):
    """(model, tokenizer, ShiftedLM or None) of an export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (export / "shifcon.json").is_file():
        from methods.shifcon.infer import ShiftedLM

        lm = ShiftedLM.from_export(export)
        return lm.model, lm.tokenizer, lm
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(export)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, None


@torch.no_grad()
def evaluate_export(
    export: Path,
    held: list,
    languages: list[str],
    band: tuple[int, int],
    batch_size: int = 8,
    answer_tokens: int = 0,
) -> dict[str, Any]:
    """Answer NLL per language, gaps, bitext in the band, detection (see module docstring)."""
    from data.formatting import Example, collate, content_span, encode_example
    from methods.shifcon.math import pooled_mean
    from methods.subspace import bitext_retrieval_accuracy

    model, tokenizer, shifted = _load_export(export)
    f, b = band
    band_layers = list(range(f, b))
    nll: dict[str, float] = {}
    pooled: dict[str, torch.Tensor] = {}
    for lang in languages:
        examples = []
        for item in held:
            question = item.en if lang == "en" else item.questions[lang]
            ex = encode_example(
                tokenizer, question, item.answer, lang=lang, id=item.id, max_length=1024
            )
            if answer_tokens:  # score the first `answer_tokens` answer tokens only (cost)
                prompt_len = sum(1 for x in ex.labels if x == -100)
                ex = Example(
                    ex.input_ids[: prompt_len + answer_tokens],
                    ex.labels[: prompt_len + answer_tokens],
                    "",
                    "",
                )
            examples.append(
                Example(ex.input_ids, ex.labels, "", "", span=content_span(tokenizer, question))
            )
        total, count, feats = 0.0, 0, []
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id, [""])
            lang_ids = None
            if shifted is not None and lang in shifted.languages:
                lang_ids = shifted.lang_ids([lang] * len(batch.input_ids))
            # The prompt positions: under `shift_positions: prompt` only they are shifted.
            prompt = batch.labels == -100
            context = shifted.hooks.inference_languages(lang_ids, prompt) if shifted else _null()
            with context:
                out = model(
                    input_ids=batch.input_ids,
                    attention_mask=batch.attention_mask,
                    output_hidden_states=True,
                )
            logits = out.logits[:, :-1].float()
            labels = batch.labels[:, 1:]
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(losses)
            count += int((labels != -100).sum())
            mask = batch.pool_mask()
            feats.append(
                torch.stack(
                    [pooled_mean(out.hidden_states[layer], mask) for layer in band_layers], 1
                )
            )
        nll[lang] = total / count
        pooled[lang] = torch.cat(feats)  # [N, band, D]
    result: dict[str, Any] = {"nll": nll}
    result["gap"] = {lang: nll[lang] - nll["en"] for lang in languages if lang != "en"}
    result["gap_mean"] = sum(result["gap"].values()) / len(result["gap"])
    result["bitext"] = {
        lang: sum(
            bitext_retrieval_accuracy(pooled[lang][:, j], pooled["en"][:, j], center=True)
            for j in range(len(band_layers))
        )
        / len(band_layers)
        for lang in languages
        if lang != "en"
    }
    result["bitext_mean"] = sum(result["bitext"].values()) / len(result["bitext"])
    if shifted is not None:
        from methods.shifcon.infer import detection_accuracy

        rows = [
            {"lang": lang, "instruction": item.en if lang == "en" else item.questions[lang]}
            for item in held
            for lang in languages
        ]
        result["detection"] = {
            det: detection_accuracy(shifted, rows, detector=det)
            for det in ("linear", "centroid")
            if det != "linear" or shifted.detector is not None
        }
    return result


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def mcl_curve(tracking_uri: str, run_dir: Path) -> list[float]:
    """`train/loss_mcl` per step of the run, from MLflow (empty for SFT)."""
    import mlflow

    info = run_dir / "run.json"
    if not info.is_file():
        return []
    run_id = json.loads(info.read_text())["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri)
    history = client.get_metric_history(run_id, "train/loss_mcl")
    return [m.value for m in sorted(history, key=lambda m: m.step)]


def log_quality(tracking_uri: str, run_dir: Path, result: dict[str, Any]) -> None:
    """The quality metrics into the training run's own MLflow run (side by side in the UI)."""
    import mlflow

    info = run_dir / "run.json"
    if not info.is_file():
        return
    run_id = json.loads(info.read_text())["mlflow_run_id"]
    client = mlflow.tracking.MlflowClient(tracking_uri)
    metrics = {"quality/gap_mean": result["gap_mean"], "quality/bitext_mean": result["bitext_mean"]}
    metrics.update({f"quality/nll/{k}": v for k, v in result["nll"].items()})
    metrics.update({f"quality/gap/{k}": v for k, v in result["gap"].items()})
    metrics.update({f"quality/bitext/{k}": v for k, v in result["bitext"].items()})
    for det, accs in result.get("detection", {}).items():
        metrics.update({f"quality/detect/{det}/{k}": v for k, v in accs.items()})
    ts = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[mlflow.entities.Metric(k, float(v), ts, 0) for k, v in metrics.items()]
    )


# -- report ----------------------------------------------------------------------------------


def format_table(rows: list[dict[str, Any]], languages: list[str], chance: float) -> str:
    others = [lang for lang in languages if lang != "en"]
    head = (
        ["run", "seed", "gap mean"]
        + [f"gap {x}" for x in others]
        + [
            "NLL en",
            "NLL mean",
            "bitext",
            "detect min",
            f"MCL first->last (ln B={chance:.3f})",
            "train s",
        ]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["result"]
        det = res.get("detection", {})
        best = det.get("linear") or det.get("centroid")
        mcl = r["mcl"]
        cells = [r["label"], str(r["seed"]), f"{res['gap_mean']:.4f}"]
        cells += [f"{res['gap'][x]:.4f}" for x in others]
        cells += [
            f"{res['nll']['en']:.4f}",
            f"{sum(res['nll'].values()) / len(res['nll']):.4f}",
            f"{res['bitext_mean']:.3f}",
            f"{min(best.values()):.3f}" if best else "-",
            f"{mcl[0]:.3f} -> {mcl[-1]:.3f} (min {min(mcl):.3f})" if mcl else "-",
            f"{r['seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], languages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [lang for lang in languages if lang != "en"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [k + i * width for k in range(len(others) + 1)]
        gaps = [r["result"]["gap"][x] for x in others] + [r["result"]["gap_mean"]]
        axes[0].bar(xs, gaps, width, label=f"{r['label']} s{r['seed']}")
        if r["mcl"]:
            axes[1].plot(range(1, len(r["mcl"]) + 1), r["mcl"], label=f"{r['label']} s{r['seed']}")
    axes[0].set_xticks([k + 0.4 - width / 2 for k in range(len(others) + 1)], [*others, "mean"])
    axes[0].set_ylabel("answer NLL(X) - NLL(en)  (lower is better)")
    axes[0].set_title("cross-lingual answer gap on held-out questions")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("train/loss_mcl")
    axes[1].set_title("MCL (InfoNCE) during training")
    if any(r["mcl"] for r in rows):
        axes[1].axhline(rows[0]["chance"], color="grey", linestyle="--", label="ln(batch)")
        axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--data-dir",
        help="shared data folder (default: $POLYSHIFT_SHARED_DATA, else ../shared/data)",
    )
    parser.add_argument("--out", default=str(ROOT / "runs" / "quality"))
    parser.add_argument("--runs", default="sft;shifcon", help="';'-separated run specs")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--languages", default=DEFAULT_LANGS)
    parser.add_argument("--backbone", default="embedded:smollm2-135m-instruct")
    parser.add_argument(
        "--band",
        default="12,16",
        help="f,b: ShifCon's band (unless a run sets method.band) and the layers [f, b) bitext "
        "is scored at for every run, so the column compares runs at the same layers",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8, help="global = micro batch")
    parser.add_argument("--vector-samples", type=int, default=64, help="ShifCon, per language")
    parser.add_argument("--zero-stage", type=int, default=0)
    parser.add_argument(
        "--train-items", type=int, default=400, help="train questions (x languages)"
    )
    parser.add_argument(
        "--heldout-items", type=int, default=40, help="held-out questions per language"
    )
    parser.add_argument(
        "--keep-checkpoints",
        action="store_true",
        help="(default: deleted after each run; the export stays)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny random model, a few steps (tests)"
    )
    parser.add_argument(
        "--answer-tokens",
        type=int,
        default=0,
        help="score only the first N answer tokens (0: the whole worked answer)",
    )
    parser.add_argument(
        "--reuse", action="store_true", help="skip training a run whose run dir has an export"
    )
    args = parser.parse_args(argv)

    from eval.benchmarks import shared_data_dir

    args.data_dir = str(shared_data_dir(args.data_dir))
    if not Path(args.data_dir).is_dir():
        print(
            f"error: shared data folder {args.data_dir} not found; give --data-dir or set "
            "POLYSHIFT_SHARED_DATA",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.quick:
        from tests.helpers.tiny import make_tiny_llama

        args.backbone = str(make_tiny_llama(out / "tiny_model", layers=4, hidden=64))
        args.band = "1,3"
        args.steps = args.steps or 3
        args.train_items = min(args.train_items, 12)
        args.heldout_items = min(args.heldout_items, 6)
    args.steps = args.steps or 40
    languages = args.languages.split(",")
    if languages[0] != "en":
        print("error: --languages must start with en (the dominant language)", file=sys.stderr)
        return 2
    try:
        train, held = write_data(args, out, languages)
    except Exception as exc:  # UserError from the loader: bad or missing files
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"data: {len(train)} train questions x {len(languages)} languages, "
        f"{len(held)} held-out questions per language ({args.data_dir})",
        flush=True,
    )
    specs = [parse_run(s) for s in args.runs.split(";") if s.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    uri = f"sqlite:///{out / 'mlflow.db'}"
    band = tuple(int(x) for x in args.band.split(","))
    rows = []
    for seed in seeds:
        for label, method, overrides in specs:
            recipe = base_recipe(args, out)
            recipe["method"] = method_section(method, args, out)
            recipe["training"]["seed"] = seed
            for key, value in overrides.items():
                _set(recipe, key, value)
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in label)
            name = f"{safe}_s{seed}"
            recipe = {"name": name, **recipe}
            start = time.time()
            run_dir = train_run(recipe, out, name, reuse=args.reuse)
            seconds = time.time() - start
            print(
                f"  evaluating {name} on {len(held)} held-out questions x {len(languages)}",
                flush=True,
            )
            result = evaluate_export(
                run_dir / "export", held, languages, band, answer_tokens=args.answer_tokens
            )
            log_quality(uri, run_dir, result)
            curve = mcl_curve(uri, run_dir)
            mcl_batch = recipe["method"].get("mcl_batch_size", 8)
            rows.append(
                {
                    "label": label,
                    "seed": seed,
                    "result": result,
                    "mcl": curve,
                    "chance": math.log(mcl_batch),
                    "seconds": seconds,
                }
            )
            if not args.keep_checkpoints:
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            print(
                f"  {name}: gap mean {result['gap_mean']:.4f}, NLL en {result['nll']['en']:.4f}",
                flush=True,
            )
            (out / "quality.json").write_text(json.dumps(rows, indent=2))
    table = format_table(rows, languages, math.log(8 if not args.quick else 4))
    print(table)
    note = (
        f"\n\n{len(held)} held-out questions per language (split: data/gsm8k_shared.py), "
        f"{args.steps} steps, backbone {args.backbone}; bitext scored at layers {list(band)} "
        f"[f, b) for every run (a run's own band may differ); MLflow: {uri} "
        f"(experiment {EXPERIMENT}).\n"
    )
    (out / "quality.md").write_text(table + note)
    plot(rows, languages, out / "quality.png")
    print(f"\ntable: {out / 'quality.md'}  plot: {out / 'quality.png'}  runs: {out / 'runs'}")
    print(f"mlflow ui --backend-store-uri {uri}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
