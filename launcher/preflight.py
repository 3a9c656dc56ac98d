"""Checks of files and the machine before any work, model load or run directory.

A broken backbone (corrupt config.json, a random safetensors header, a text file named .gguf,
missing weights or tokenizer, a string where an int belongs), a data file that is not JSON
Lines, an output_dir that is a file or not writable, a GPU recipe on a machine without CUDA, a
raw DeepSpeed block with a typo: each is one `UserError` naming the field and the file, raised
by the run CLI before the run directory exists and by the model CLIs before they load a model.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from config.errors import UserError
from config.schema import ModelSection, Recipe

# Integer fields of a HF config.json that the model classes use as sizes.
_INT_CONFIG_FIELDS = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the format's own limit
_FIRST_LINES = 5  # lines of a JSON Lines file parsed before the run


class PreflightError(UserError):
    """A file or machine problem found before any work; the message names field and file."""


# -- files ----------------------------------------------------------------------------------


def read_json_file(path: Path, field: str) -> Any:
    """A JSON file, or a PreflightError naming the field, the file and the line."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PreflightError(f"{field}: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PreflightError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreflightError(
            f"{field}: {path}:{exc.lineno}:{exc.colno}: invalid JSON ({exc.msg})"
        ) from None


def check_safetensors(path: Path, field: str) -> None:
    """The header of a .safetensors file: its length, its JSON, every tensor inside the file."""
    try:
        size = path.stat().st_size
        with path.open("rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise PreflightError(f"{field}: {path} is not a safetensors file (too short)")
            (length,) = struct.unpack("<Q", head)
            if length == 0 or length > _MAX_SAFETENSORS_HEADER or 8 + length > size:
                raise PreflightError(
                    f"{field}: {path} is not a safetensors file (header length {length} "
                    f"for a file of {size} bytes)"
                )
            raw = fh.read(length)
    except OSError as exc:
        raise PreflightError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise PreflightError(f"{field}: {path} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise PreflightError(f"{field}: {path} has a corrupt safetensors header")
    data_size = size - 8 - length
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise PreflightError(
                f"{field}: {path}: tensor {name!r} lies outside the file (truncated or corrupt)"
            )


def _check_weights(root: Path, field: str) -> None:
    present = [name for name in _WEIGHT_FILES if (root / name).is_file()]
    if not present:
        raise PreflightError(
            f"{field}: {root} has no weights (expected one of {', '.join(_WEIGHT_FILES)})"
        )
    name = present[0]
    if name == "model.safetensors":
        check_safetensors(root / name, field)
    elif name.endswith(".index.json"):
        index = read_json_file(root / name, field)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise PreflightError(f"{field}: {root / name} has no weight_map")
        for shard in sorted(set(map(str, weight_map.values()))):
            shard_path = root / shard
            if not shard_path.is_file():
                raise PreflightError(f"{field}: {shard_path} (named in {name}) is missing")
            if shard.endswith(".safetensors"):
                check_safetensors(shard_path, field)


def _check_config(root: Path, field: str, trust_remote_code: bool = False) -> dict[str, Any]:
    config_file = root / "config.json"
    config = read_json_file(config_file, field)
    if not isinstance(config, dict):
        raise PreflightError(f"{field}: {config_file} is not a JSON object")
    for key in _INT_CONFIG_FIELDS:
        value = config.get(key)
        if value is None and key in ("head_dim", "num_key_value_heads"):
            continue
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise PreflightError(f"{field}: {config_file}: {key} must be an integer, got {value!r}")
        if isinstance(value, int) and value <= 0:
            raise PreflightError(f"{field}: {config_file}: {key} must be positive, got {value}")
    from transformers import AutoConfig

    try:  # an unknown model_type, an inconsistent shape: transformers' own checks
        AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    except Exception as exc:  # any failure here is the file's
        raise PreflightError(
            f"{field}: {config_file} is not a valid model config ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    return config


def _check_tokenizer(root: Path, field: str) -> None:
    present = [name for name in _TOKENIZER_FILES if (root / name).is_file()]
    if not present:
        raise PreflightError(
            f"{field}: {root} has no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (root / name).is_file():
            read_json_file(root / name, field)


def check_gguf(path: Path, field: str) -> None:
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise PreflightError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise PreflightError(f"{field}: {path} is not a GGUF file (it does not start with GGUF)")


def check_model_dir(root: Path, field: str = "model.backbone", trust_remote_code: bool = False):
    """A local Hugging Face directory (or an export) that from_pretrained can load: config,
    weights and tokenizer present and well-formed. Returns the parsed config.json."""
    if not root.is_dir():
        raise PreflightError(f"{field}: {root} is not a directory")
    if not (root / "config.json").is_file():
        raise PreflightError(f"{field}: {root} has no config.json (not a HF model dir)")
    config = _check_config(root, field, trust_remote_code)
    _check_weights(root, field)
    _check_tokenizer(root, field)
    return config


def check_backbone(
    section: ModelSection, field: str = "model.backbone", *, download: bool = True
) -> dict[str, Any] | None:
    """The backbone's files before any load; its config.json when it is a local directory (or
    a cached/downloaded hub snapshot), None for GGUF and embedded models (converted later).
    With ``download=False`` (a dry run) a hub id that is not cached is a note, not an error."""
    spec = section.backbone
    if spec.startswith("embedded:"):
        return None
    path = Path(spec).expanduser()
    if section.gguf_file:
        gguf = path / section.gguf_file
        if not gguf.is_file():
            raise PreflightError(f"model.gguf_file: {gguf} does not exist")
        check_gguf(gguf, "model.gguf_file")
        return None
    if path.suffix == ".gguf":
        if not path.is_file():
            raise PreflightError(f"{field}: GGUF file {path} does not exist")
        check_gguf(path, field)
        return None
    if path.is_dir():
        return check_model_dir(path, field, section.trust_remote_code)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise PreflightError(f"{field}: {spec} is not a model directory or a .gguf file")
    if not download:
        from huggingface_hub import snapshot_download

        try:
            cached = Path(snapshot_download(spec, revision=section.revision, local_files_only=True))
        except Exception:  # not cached (or not a valid id): the real run resolves and reports
            print(
                f"note: {field}: {spec!r} is not in the local Hugging Face cache; its files are "
                "checked when the run starts",
                file=sys.stderr,
            )
            return None
        return check_model_dir(cached, field, section.trust_remote_code)
    from model.backbone import resolve_backbone

    resolved = resolve_backbone(section)  # a hub id: from the cache (or downloaded) now
    return check_model_dir(resolved.path, field, section.trust_remote_code)


def check_data_source(source: str, field: str) -> None:
    """A local JSON Lines file (or folder of them): present, UTF-8, its first lines JSON objects.
    Other sources (builtin:, datasets ids, parquet/csv) are read by their own loaders."""
    if source.startswith("builtin:"):
        builtin_rows(source, field)
        return
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or path.suffix.lower() in (
        ".jsonl",
        ".json",
        ".csv",
        ".parquet",
    )
    if not path.exists():
        if looks_local:
            raise PreflightError(f"{field}: {source} does not exist")
        return
    if path.is_dir():
        files = sorted(p for p in path.glob("*.jsonl") if p.is_file())
    elif path.suffix.lower() in (".jsonl", ".json"):
        files = [path]
    else:
        files = []
    for file in files:
        _check_jsonl_head(file, field)


def builtin_rows(source: str, field: str) -> list[dict]:
    """A builtin source's rows (synthetic, built in milliseconds): a bad query is named now."""
    from data.sources import load_rows

    try:
        rows, _ = load_rows(source)
    except UserError as exc:
        raise PreflightError(f"{field}: {exc}") from None
    return rows


def check_languages(recipe: Recipe) -> None:
    """data.languages without a row, when every train source is builtin (known before any
    load); other sources are read by the data pipeline, which names a missing language."""
    wanted = recipe.data.languages
    sources = recipe.data.train
    if not wanted or not all(s.path.startswith("builtin:") for s in sources):
        return
    have = {
        row.get("lang")
        for i, s in enumerate(sources)
        for row in builtin_rows(s.path, f"data.train.{i}.path")
    }
    missing = [lang for lang in wanted if lang not in have]
    if missing:
        raise PreflightError(
            f"data.languages: no training rows for {missing} in "
            f"{', '.join(s.path for s in sources)}"
        )


def _check_jsonl_head(path: Path, field: str) -> None:
    try:
        with path.open("rb") as fh:
            start = fh.read(1)
            if path.suffix.lower() == ".json" and start == b"[":
                return  # a JSON array: its loader reports the row at fault
            fh.seek(0)
            seen = 0
            for number, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    raise PreflightError(f"{field}: {path}:{number}: not UTF-8 text") from None
                except json.JSONDecodeError as exc:
                    raise PreflightError(
                        f"{field}: {path}:{number}: invalid JSON ({exc.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise PreflightError(
                        f"{field}: {path}:{number}: a row is a JSON object, got "
                        f"{type(row).__name__}"
                    )
                seen += 1
                if seen >= _FIRST_LINES:
                    break
    except OSError as exc:
        raise PreflightError(f"{field}: cannot read {path} ({exc.strerror or exc})") from None


# -- the machine ----------------------------------------------------------------------------


def check_output_dir(recipe: Recipe) -> None:
    """The run directory can be created: no file in the way, the nearest existing folder is
    writable (tried for real: a temporary folder is made and removed)."""
    run_dir = Path(recipe.output_dir).expanduser() / recipe.name
    for parent in [run_dir, *run_dir.parents]:
        if parent.exists():
            break
    if not parent.is_dir():
        which = "output_dir" if parent != run_dir else "name"
        raise PreflightError(f"{which}: {parent} is a file, not a directory (run dir {run_dir})")
    try:
        tempfile.TemporaryDirectory(dir=parent, prefix=".polyshift-write-test-").cleanup()
    except OSError as exc:
        raise PreflightError(
            f"output_dir: cannot create {run_dir}: {parent} is not writable ({exc.strerror or exc})"
        ) from None


def check_device(recipe: Recipe, mode: str, dry_run: bool = False) -> str:
    """The device this machine will run the recipe on ("cpu"/"cuda"), or a PreflightError.

    `cluster.device: gpu` without CUDA is an error for a local run; under --dry-run it is a
    note and the plan is shown for GPU workers (planning on a login node is the use case), and
    with Ray the workers, not this driver, need the GPUs."""
    import torch

    cluster = recipe.cluster
    if cluster.device != "gpu":
        if cluster.device == "cpu" or not torch.cuda.is_available():
            return "cpu"
        return "cuda"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if mode == "local" and cluster.workers_per_node > count and not dry_run:
            raise PreflightError(
                f"cluster.workers_per_node: {cluster.workers_per_node} GPU workers on a machine "
                f"with {count} GPU(s)"
            )
        return "cuda"
    if dry_run:
        print(
            "note: cluster.device: gpu but CUDA is not available on this machine; the plan "
            "below is for GPU workers",
            file=sys.stderr,
        )
        return "cuda"
    if mode == "ray":
        return "cuda"
    raise PreflightError(
        "cluster.device: gpu was requested but CUDA is not available on this machine "
        "(use device: auto or cpu, or run where the GPUs are)"
    )


def check_local_workers(recipe: Recipe, mode: str, device: str) -> None:
    """CPU workers started on this machine: at most 8 per core (more only thrashes or hangs)."""
    if mode != "local" or device != "cpu":
        return
    cores = os.cpu_count() or 1
    if recipe.cluster.workers_per_node > 8 * cores:
        raise PreflightError(
            f"cluster.workers_per_node: {recipe.cluster.workers_per_node} CPU workers on a "
            f"machine with {cores} core(s) (at most {8 * cores})"
        )


# -- the raw DeepSpeed block ----------------------------------------------------------------

_BATCH_KEYS = {
    "train_batch_size": "training.global_batch_size",
    "train_micro_batch_size_per_gpu": "training.micro_batch_size",
    "gradient_accumulation_steps": "training.global_batch_size / (micro_batch_size x dp)",
}


class _SeenKeys(dict):
    """A dict that records which keys DeepSpeed's config parser asked for."""

    seen: set

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seen = set()

    def get(self, key: Any, *default: Any) -> Any:
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key: Any) -> Any:
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self.seen.add(key)
        return super().__contains__(key)


def deepspeed_block_errors(recipe: Recipe, config: dict[str, Any], device: str) -> list[str]:
    """What is wrong with `parallel.deepspeed` once merged into the generated `config`:
    batch sizes that contradict the training section, optimizer arguments torch's AdamW
    refuses, and keys DeepSpeed's own config parser does not know (or rejects)."""
    raw = recipe.parallel.deepspeed
    errors: list[str] = []
    generated = {
        "train_batch_size": recipe.training.global_batch_size,
        "train_micro_batch_size_per_gpu": recipe.training.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum_steps,
    }
    for key, expected in generated.items():
        if key in raw and raw[key] != expected:
            errors.append(
                f"parallel.deepspeed.{key}: {raw[key]!r} contradicts the recipe's batch "
                f"arithmetic ({_BATCH_KEYS[key]} gives {expected}: train_batch_size = "
                f"micro x accumulation x data-parallel = {recipe.training.micro_batch_size} x "
                f"{recipe.grad_accum_steps} x {recipe.data_parallel_size}); set the training "
                "fields instead"
            )
    errors += _optimizer_errors(config.get("optimizer"))
    if errors or not raw:
        # Without a raw block the config is all generated from the checked recipe: no need to
        # pay DeepSpeed's import (about 5 s) in the launching process.
        return errors
    return _deepspeed_parser_errors(config, raw, device)


def _optimizer_errors(optimizer: Any) -> list[str]:
    if optimizer is None:
        return []
    where = "parallel.deepspeed.optimizer"
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("params", {}), dict):
        return [f"{where}: expected {{type: ..., params: {{...}}}}"]
    params = optimizer.get("params", {})
    errors = []

    def number(key: str) -> float | None:
        value = params.get(key)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            errors.append(f"{where}.params.{key}: expected a number, got {value!r}")
            return None
        if value != value or value in (float("inf"), float("-inf")):
            errors.append(f"{where}.params.{key}: must be finite, got {value}")
            return None
        return float(value)

    lr, eps, wd = number("lr"), number("eps"), number("weight_decay")
    if lr is not None and lr < 0:
        errors.append(f"{where}.params.lr: must be >= 0, got {lr}")
    if eps is not None and eps <= 0:
        errors.append(f"{where}.params.eps: must be > 0, got {eps}")
    if wd is not None and wd < 0:
        errors.append(f"{where}.params.weight_decay: must be >= 0, got {wd}")
    betas = params.get("betas")
    if betas is not None:
        ok = (
            isinstance(betas, list | tuple)
            and len(betas) == 2
            and all(not isinstance(b, bool) and isinstance(b, int | float) for b in betas)
            and all(0.0 <= b < 1.0 for b in betas)
        )
        if not ok:
            errors.append(f"{where}.params.betas: two numbers in [0, 1), got {betas!r}")
    return errors


def _deepspeed_parser_errors(config: dict[str, Any], raw: dict[str, Any], device: str) -> list[str]:
    """DeepSpeed's DeepSpeedConfig on the merged config (one process: world size 1, so the
    batch keys are given for one rank); its pydantic sections forbid unknown keys, and a
    top-level key of the raw block that the parser never reads is a typo."""
    from parallel.distributed import prepare_accelerator_env

    prepare_accelerator_env(device)  # DeepSpeed picks its accelerator when imported
    import logging

    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.utils import logger as ds_logger

    single = _SeenKeys(config)
    single["train_batch_size"] = (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    )
    level = ds_logger.level
    ds_logger.setLevel(logging.ERROR)
    try:
        DeepSpeedConfig(single)
    except Exception as exc:  # DeepSpeed raises assertions, pydantic, its own
        text = " ".join(str(exc).split())
        return [f"parallel.deepspeed: DeepSpeed rejects the merged config: {text[:600]}"]
    finally:
        ds_logger.setLevel(level)
    # What the generated config holds but DeepSpeed's parser does not read (seed) is ours.
    ours = {"seed"}
    unknown = sorted(str(k) for k in raw if k not in single.seen and k not in ours)
    return [
        f"parallel.deepspeed.{key}: not a DeepSpeed config key (unknown to "
        "deepspeed.runtime.config.DeepSpeedConfig)"
        for key in unknown
    ]


def first_error(errors: Iterable[str]) -> None:
    for message in errors:
        raise PreflightError(message)
