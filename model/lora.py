"""LoRA adapters on a Hugging Face decoder through peft, and what an export makes of them.

The adapters are injected into the HF model in place (peft's ``inject_adapter_in_model``), not
wrapped in a ``PeftModel``: the decoder layer stack, the forward's keyword arguments (ShifCon's
per-row language ids) and ``config`` stay exactly where every method and engine looks for them,
and forward hooks on decoder layers fire as before. peft only swaps the targeted ``nn.Linear``
modules for LoRA layers (the original linear becomes their ``base_layer``) and freezes the rest.

The merge works on a full state dict (what ZeRO-3 gathers one parameter at a time on rank 0),
so no rank ever holds a second, merged copy of the partitioned model:
``W' = W + scaling * B @ A`` per adapted linear, with peft's own ``scaling`` of that layer.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from config.errors import UserError
from config.schema import LoraSection

ADAPTER = "default"  # peft's adapter name; the on-disk format drops it
ADAPTER_DIR = "adapter"  # export/<ADAPTER_DIR>: adapter_config.json + adapter_model.safetensors
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"\.lora_[A-Za-z_]+\.")


def lora_config(section: LoraSection, num_layers: int, linears: list[str] | None = None):
    """peft's ``LoraConfig`` for the recipe section; 1-based ``layers`` become peft's 0-based
    ``layers_to_transform``. ``linears``: the model's linear module names, what all-linear
    stands for when layers are chosen too (peft takes layers only with a list of names)."""
    from peft import LoraConfig

    layers = None
    if section.layers is not None:
        beyond = [n for n in section.layers if n > num_layers]
        if beyond:
            raise UserError(
                f"lora.layers: {beyond} beyond the backbone's {num_layers} decoder layers "
                "(numbers are 1-based)"
            )
        layers = [n - 1 for n in section.layers]
    targets = section.target_modules
    if targets == "all-linear" and layers is not None and linears is not None:
        targets = linears
    return LoraConfig(
        r=section.rank,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        layers_to_transform=layers,
        layers_pattern=None if layers is None else "layers",
        use_rslora=section.rslora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def check_quantize(section: LoraSection, device: str) -> None:
    """QLoRA-style 4-bit bases are not built here: refuse before any weight is loaded."""
    if section.quantize == "none":
        return
    if device != "cuda":
        raise UserError(
            f"lora.quantize: {section.quantize} needs a CUDA device and bitsandbytes; this run "
            f"is on {device} (set lora.quantize: none)"
        )
    raise UserError(
        f"lora.quantize: {section.quantize} (QLoRA) is not supported by this build's ZeRO-3 "
        "engine yet; use lora.quantize: none (the frozen base in bf16)"
    )


def apply_lora(model: nn.Module, section: LoraSection) -> int:
    """Inject the adapters into ``model`` in place and freeze everything else; returns the
    number of trainable (adapter) parameters."""
    from peft import inject_adapter_in_model

    config = lora_config(section, model.config.num_hidden_layers, _decoder_linears(model))
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as exc:
        raise UserError(f"lora.target_modules: {exc}") from None
    model.train(model.training)  # the new dropout modules take the model's mode
    trainable = 0
    for name, param in model.named_parameters():
        is_adapter = bool(_LORA_KEY.search(name))
        param.requires_grad_(is_adapter)
        trainable += param.numel() if is_adapter else 0
    if not trainable:
        raise UserError("lora.target_modules: no adapter was created (no module matched)")
    return trainable


def _decoder_linears(model: nn.Module) -> list[str]:
    """Names of the linears below the LM head (peft's all-linear)."""
    head = model.get_output_embeddings()
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    return sorted(names - {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head})


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> peft LoRA layer, for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The plain HF state dict of ``model`` with every adapter folded into its base weight.

    ``state`` is the full state dict of the adapted model (keys as ``model.state_dict()``);
    the result has the backbone's own keys, so plain ``from_pretrained`` loads it. The sum is
    taken in float32 and stored in the base weight's dtype."""
    merged: dict[str, torch.Tensor] = {}
    for name, module in lora_modules(model).items():
        if set(module.lora_A) != {ADAPTER} or module.lora_embedding_A:
            raise ValueError(f"{name}: only one linear adapter ({ADAPTER!r}) can be merged")
        a = state[f"{name}.lora_A.{ADAPTER}.weight"].float()
        b = state[f"{name}.lora_B.{ADAPTER}.weight"].float()
        base = state[f"{name}.base_layer.weight"]
        delta = (b @ a) * module.scaling[ADAPTER]
        if getattr(module, "fan_in_fan_out", False):
            delta = delta.T
        merged[f"{name}.weight"] = (base.float() + delta).to(base.dtype).contiguous()
    for key, value in state.items():
        if _LORA_KEY.search(key):
            continue
        merged.setdefault(key.replace(".base_layer.", "."), value)
    return merged


def adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapter weights in peft's on-disk naming (what ``PeftModel.from_pretrained`` reads:
    ``base_model.model.<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    own = get_peft_model_state_dict(
        model, state_dict=state, adapter_name=ADAPTER, save_embedding_layers=False
    )
    return {f"base_model.model.{k}": v.contiguous() for k, v in own.items()}


def save_adapter(
    model: nn.Module, state: dict[str, torch.Tensor], directory: Path, base: str
) -> Path:
    """``directory``: adapter_config.json (base_model_name_or_path = ``base``) and
    adapter_model.safetensors, loadable with ``PeftModel.from_pretrained(base_model, directory)``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = base
    config.inference_mode = True
    config.save_pretrained(str(directory))
    tensors = {k: v.detach().cpu() for k, v in adapter_state_dict(model, state).items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return directory


def adapter_summary(model: nn.Module) -> dict[str, object]:
    """What was adapted, for logs: modules, rank, alpha, 1-based layers."""
    config = model.peft_config[ADAPTER]
    layers = config.layers_to_transform
    return {
        "modules": len(lora_modules(model)),
        "rank": config.r,
        "alpha": config.lora_alpha,
        "layers": None if layers is None else [n + 1 for n in layers],
    }


def summary_line(model: nn.Module, trainable: int, total: int) -> str:
    info = adapter_summary(model)
    return (
        f"lora: {trainable:,} trainable parameters of {total:,} ({100 * trainable / total:.3f}%); "
        + json.dumps(info)
    )
