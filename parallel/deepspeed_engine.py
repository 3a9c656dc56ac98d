"""DeepSpeed ZeRO adapter: builds the partitioned model, steps it, checkpoints and exports it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from config.schema import Recipe
from data.formatting import Batch
from methods.base import Method
from model.backbone import ResolvedBackbone, load_causal_lm
from model.lora import ADAPTER_DIR, apply_lora, check_quantize, merged_state_dict, save_adapter
from model.lora import summary_line as lora_summary
from parallel.distributed import DistContext, all_reduce_sum_
from parallel.ds_config import build_deepspeed_config, resolve_precision
from parallel.engine import DecodeState, Engine, StepResult


class DeepSpeedEngine(Engine):
    def __init__(
        self, recipe: Recipe, ctx: DistContext, backbone: ResolvedBackbone, method: Method
    ) -> None:
        import deepspeed
        from transformers.integrations import HfDeepSpeedConfig

        self.ctx, self.method = ctx, method
        # DeepSpeed keeps its own view of the (already initialised) torch process group.
        deepspeed.init_distributed(dist_backend="nccl" if ctx.device == "cuda" else "gloo")
        self.config = build_deepspeed_config(recipe, ctx.device)
        dtype = torch.bfloat16 if resolve_precision(recipe, ctx.device) == "bf16" else torch.float32
        # While this object lives, from_pretrained builds the model inside zero.Init: each layer
        # is partitioned as it is created, so no rank ever holds the full model.
        self._hf_ds_config = (
            HfDeepSpeedConfig(self.config) if recipe.parallel.zero_stage == 3 else None
        )
        self.lora = recipe.lora.enabled
        self.backbone = backbone
        if self.lora:
            check_quantize(recipe.lora, ctx.device)
        model = load_causal_lm(backbone, recipe.model, dtype)
        if self.lora:
            # Before the engine wraps it: the adapters are ordinary (not yet partitioned)
            # parameters, the only ones handed to the optimizer below; the frozen base keeps
            # no gradient and no optimizer state. Hooks a method adds next sit on the same
            # decoder layers (peft swaps only the linears inside them).
            trainable = apply_lora(model, recipe.lora)
            total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
            if ctx.is_rank0:
                print(lora_summary(model, trainable, total), flush=True)
        method.attach(model)
        params = [p for p in model.parameters() if p.requires_grad]
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=params, config=self.config
        )
        self.zero_stage = recipe.parallel.zero_stage

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.ds

    def train_step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        if len(micro_batches) != self.ds.gradient_accumulation_steps():
            raise ValueError(
                f"{len(micro_batches)} micro-batches for "
                f"{self.ds.gradient_accumulation_steps()} gradient-accumulation steps"
            )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.ds.train()
        total = torch.zeros(1, dtype=torch.float64)
        metric_sums: dict[str, float] = {}
        for micro in micro_batches:
            loss, metrics = self.method.loss(self.ds, micro.to(self.ctx.torch_device))
            self.ds.backward(loss)
            self.ds.step()  # DeepSpeed only updates at the accumulation boundary
            total += loss.detach().double().cpu()
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + value
        keys = sorted(metric_sums)
        packed = torch.tensor([total.item(), *(metric_sums[k] for k in keys)], dtype=torch.float64)
        all_reduce_sum_(packed)  # one collective for every logged scalar
        scale = 1.0 / (len(micro_batches) * self.ctx.world_size)
        norm = self.ds.get_global_grad_norm()
        return StepResult(
            loss=packed[0].item() * scale,
            grad_norm=None if norm is None else float(norm),
            metrics={k: packed[i + 1].item() * scale for i, k in enumerate(keys)},
        )

    @torch.no_grad()
    def forward_logits(self, batch: Batch) -> torch.Tensor:
        self.ds.eval()
        batch = batch.to(self.ctx.torch_device)
        logits = self.method.logits(self.ds, batch)
        self.ds.train()
        return logits

    # -- cached generation ------------------------------------------------------------------

    def prefill(self, batch: Batch, max_new_tokens: int) -> tuple[torch.Tensor, DecodeState]:
        """ZeRO-3 on one rank: DeepSpeed's ``unwrap_model_for_generation`` for the whole decode
        (every weight gathered once and ZeRO's per-module hooks off: what TRL generates with),
        instead of gathering and freeing each layer and running the hooks at every token; on
        one rank the partition is the whole model already, so only the working copy is extra.
        On more ranks each layer is gathered and freed per step, as in any ZeRO-3 forward
        (the memory-safe path for a model that does not fit one device)."""
        if not (self.zero_stage == 3 and self.ctx.world_size == 1):
            return super().prefill(batch, max_new_tokens)
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        held = ExitStack()
        held.enter_context(unwrap_model_for_generation(self.ds))
        try:
            return self._hf_prefill(batch, self.module, held)
        except BaseException:
            held.close()
            raise

    def param_counts(self) -> tuple[int, int]:
        params = list(self.module.parameters())
        if self.zero_stage == 3:
            return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
        total = sum(p.numel() for p in params)
        return total, total

    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> None:
        self.ds.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    def load(self, root: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.ds.load_checkpoint(
            str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise RuntimeError(f"checkpoint {root / tag} could not be loaded")
        return client_state or {}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full weights on rank 0 (None elsewhere), gathered one parameter at a time."""
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
            return state if self.ctx.is_rank0 else None
        return self.module.state_dict() if self.ctx.is_rank0 else None

    def export(self, directory: Path) -> None:
        state = self.full_state_dict()  # collective under ZeRO-3: every rank must call it
        if self.ctx.is_rank0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            if self.lora:  # the peft adapter beside the merged model plain transformers loads
                save_adapter(self.module, state, directory / ADAPTER_DIR, str(self.backbone.path))
                state = merged_state_dict(self.module, state)
            self.module.save_pretrained(directory, state_dict=state, safe_serialization=True)
