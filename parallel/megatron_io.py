"""Hugging Face weights in and out of a megatron-core stage, with no rank holding the whole model.

In: each stage reads only its own layers' tensors from the safetensors files and converts them
(`parallel/megatron_convert.py`) into its TP shard. Out: each stage's TP group gathers its
shards, its TP rank 0 writes that stage's safetensors file, rank 0 the index and config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from config.errors import UserError
from parallel.megatron_convert import hf_to_mcore, mcore_to_hf
from parallel.megatron_model import DecoderShape, from_spec_names, to_spec_names


class SafetensorsReader:
    """Lazy HF tensor reads: a stage opens only the tensors of its own layers."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        else:
            single = directory / "model.safetensors"
            if not single.is_file():
                raise UserError(
                    f"model.backbone: {directory} has no safetensors weights (the megatron "
                    "engine reads model.safetensors or its index)"
                )
            with safe_open(str(single), "pt") as f:
                files = dict.fromkeys(f.keys(), "model.safetensors")
        self.directory, self.files = directory, files
        self._open = safe_open

    def __call__(self, name: str) -> Tensor:
        if name not in self.files:
            raise KeyError(f"{self.directory}: no tensor {name!r} in the checkpoint")
        with self._open(str(self.directory / self.files[name]), "pt") as f:
            return f.get_tensor(name)


@dataclass(frozen=True)
class StagePlace:
    """Where this rank's shard sits in the TP x PP grid."""

    shape: DecoderShape
    layers: range  # global 1-based decoder layers of this stage
    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    transformer_engine: bool = False  # the TE spec: fused norms carry other names

    @property
    def first(self) -> bool:
        return self.pp_rank == 0

    @property
    def last(self) -> bool:
        return self.pp_rank == self.pp - 1


def load_hf_weights(model: torch.nn.Module, read: SafetensorsReader, place: StagePlace) -> None:
    """Copy this stage's TP shard of the HF checkpoint into the freshly built model chunk."""
    converted = hf_to_mcore(
        read,
        place.shape,
        place.layers,
        tp=place.tp,
        tp_rank=place.tp_rank,
        pre_process=place.first,
        post_process=place.last,
    )
    converted = to_spec_names(converted, place.transformer_engine)
    state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
    if set(state) != set(converted):
        missing, extra = sorted(set(state) - set(converted)), sorted(set(converted) - set(state))
        raise RuntimeError(f"HF -> megatron: missing {missing[:5]}, unexpected {extra[:5]}")
    with torch.no_grad():
        for name, tensor in converted.items():
            state[name].copy_(tensor)


def export_hf_weights(
    module: torch.nn.Module,
    directory: Path,
    place: StagePlace,
    *,
    tp_group: Any,
    pp_group: Any,
    hf_config: Any,
    dtype: torch.dtype,
    is_rank0: bool,
) -> None:
    """A Hugging Face directory of the current weights (a collective over every rank)."""
    from safetensors.torch import save_file

    local = {k: v.detach() for k, v in module.state_dict().items() if "_extra_state" not in k}
    local = from_spec_names(local, place.transformer_engine)
    shards: list[dict[str, Tensor]] = [{} for _ in range(place.tp)]
    for name in sorted(local):
        parts = [torch.empty_like(local[name]) for _ in range(place.tp)]
        dist.all_gather(parts, local[name].contiguous(), group=tp_group)
        for r, part in enumerate(parts):
            shards[r][name] = part.cpu()
    hf = mcore_to_hf(
        shards, place.shape, place.layers, pre_process=place.first, post_process=place.last
    )
    pp = place.pp
    filename = f"model-{place.pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    names: list[Any] = [None] * pp
    dist.all_gather_object(names, sorted(hf), group=pp_group)
    if place.tp_rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(hf, str(directory / filename), metadata={"format": "pt"})
    if is_rank0:
        weight_map = {
            name: f"model-{stage + 1:05d}-of-{pp:05d}.safetensors"
            for stage, stage_names in enumerate(names)
            for name in stage_names
        }
        index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = hf_config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        hf_config.__class__.from_dict(config).save_pretrained(directory)
    dist.barrier()
