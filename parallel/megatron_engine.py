"""Megatron-core adapter: tensor- and pipeline-parallel training behind the Engine interface.

The recipe's data, method and tracking sections are the same as for DeepSpeed; this adapter only
decides where layers live (parallel_state: TP x PP x DP), how a micro-batch crosses the pipeline
(megatron-core's own schedules), and which group reduces what. A Hugging Face checkpoint goes in
(`parallel/megatron_convert.py`), a Hugging Face directory comes out, and checkpoints in between
are megatron-core distributed checkpoints, which reload into any TP/PP/DP layout.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from config.errors import UserError
from config.schema import Recipe
from data.formatting import Batch, Example
from methods.base import Method, lm_loss
from model.backbone import ResolvedBackbone
from parallel import megatron_cpu
from parallel.distributed import DistContext
from parallel.ds_config import resolve_precision
from parallel.engine import Engine, StepResult
from parallel.megatron_convert import hf_to_mcore, mcore_to_hf
from parallel.megatron_model import (
    DecoderShape,
    build_gpt_model,
    layout_errors,
    stage_layers,
    summary,
    transformer_config,
)

CLIENT_STATE = "polyshift_client_state.pt"

# megatron-core announces every optional kernel it falls back from; the local spec is a choice.
for _message in (
    r".*(Transformer Engine|Apex).* not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


@dataclass
class Feed:
    """One micro-batch as megatron sees it: ids and, for a method, per-row context."""

    input_ids: Tensor  # [rows, T]
    context: Tensor | None  # [rows, 4] (see model/shifcon_megatron.py) or None
    batch: Batch | None  # the LM rows (labels, normaliser); None for a probe pass


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


class MegatronEngine(Engine):
    def __init__(
        self, recipe: Recipe, ctx: DistContext, backbone: ResolvedBackbone, method: Method
    ) -> None:
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        self.ctx, self.method, self.recipe = ctx, method, recipe
        p = recipe.parallel
        self.tp, self.pp = p.tensor_parallel, p.pipeline_parallel
        self.on_gpu = ctx.device == "cuda"
        if not self.on_gpu:
            megatron_cpu.enable()
        self.hf_config = AutoConfig.from_pretrained(
            backbone.path, trust_remote_code=recipe.model.trust_remote_code
        )
        try:
            self.shape = DecoderShape.from_hf(self.hf_config)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        s = self.shape
        errors = layout_errors(s.layers, s.heads, s.kv_heads, self.tp, self.pp)
        if errors:
            raise UserError("; ".join(errors))
        if p.sequence_parallel and self.tp == 1:
            raise UserError("parallel.sequence_parallel: needs tensor_parallel > 1")
        if not self.on_gpu and (p.sequence_parallel or p.distributed_optimizer):
            raise UserError(
                "parallel.sequence_parallel/distributed_optimizer: need reduce-scatter, which "
                "gloo (CPU) does not have; use them on GPUs (NCCL)"
            )
        self.dtype = (
            torch.bfloat16 if resolve_precision(recipe, ctx.device) == "bf16" else torch.float32
        )
        with self.device_scope():
            ps.initialize_model_parallel(
                tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp
            )
            self._seed(recipe.training.seed)
            self.tconfig = transformer_config(
                self.shape,
                tp=self.tp,
                pp=self.pp,
                dtype=self.dtype,
                sequence_parallel=p.sequence_parallel,
                recompute=recipe.model.gradient_checkpointing,
                on_gpu=self.on_gpu,
            )
            self.pp_rank = ps.get_pipeline_model_parallel_rank()
            self.tp_rank = ps.get_tensor_model_parallel_rank()
            self.layers = stage_layers(self.tconfig, self.pp_rank)
            self.stage = self._method_stage(method)
            model = build_gpt_model(
                self.shape,
                self.tconfig,
                tp=self.tp,
                pp_rank=self.pp_rank,
                pp=self.pp,
                layer_class_for=self.stage.layer_class_for if self.stage else None,
            )
            self._load_hf(model, SafetensorsReader(Path(backbone.path)))
            if self.on_gpu:
                model.cuda(torch.cuda.current_device())
            if self.stage is not None:
                self.stage.attach(model)
            self.model, self.optimizer = self._wrap(model, recipe)
        self.config = {
            "engine": "megatron",
            **summary(self.shape, self.tp, self.pp, self.dp_size),
            "dtype": str(self.dtype),
            "sequence_parallel": p.sequence_parallel,
            "distributed_optimizer": p.distributed_optimizer,
            "recompute": recipe.model.gradient_checkpointing,
        }

    # -- set-up -----------------------------------------------------------------------------

    def device_scope(self):
        return megatron_cpu.device_scope(self.ctx.device)

    def _seed(self, seed: int) -> None:
        from megatron.core import parallel_state as ps

        if self.on_gpu:
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

            model_parallel_cuda_manual_seed(seed)
        else:
            megatron_cpu.seed_model_parallel_rng(seed, ps.get_tensor_model_parallel_rank())

    def _method_stage(self, method: Method):
        if method.name == "sft":
            return None
        if method.name == "shifcon":
            from megatron.core import parallel_state as ps

            from methods.shifcon.megatron import ShifConStage

            try:
                return ShifConStage(
                    method,
                    self.layers,
                    hidden_size=self.shape.hidden,
                    dp_group=ps.get_data_parallel_group(),
                    sequence_parallel=self.recipe.parallel.sequence_parallel,
                    device=self.ctx.torch_device,
                )
            except ValueError as exc:
                raise UserError(str(exc)) from None
        raise UserError(f"method.name: {method.name!r} is not available on the megatron engine")

    def _load_hf(self, model: torch.nn.Module, read: SafetensorsReader) -> None:
        first, last = self.pp_rank == 0, self.pp_rank == self.pp - 1
        converted = hf_to_mcore(
            read,
            self.shape,
            self.layers,
            tp=self.tp,
            tp_rank=self.tp_rank,
            pre_process=first,
            post_process=last,
        )
        state = {k: v for k, v in model.state_dict().items() if "_extra_state" not in k}
        if set(state) != set(converted):
            missing, extra = (
                sorted(set(state) - set(converted)),
                sorted(set(converted) - set(state)),
            )
            raise RuntimeError(f"HF -> megatron: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, tensor in converted.items():
                state[name].copy_(tensor)

    def _wrap(self, model: torch.nn.Module, recipe: Recipe):
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        t, p = recipe.training, recipe.parallel
        ddp = DistributedDataParallel(
            self.tconfig,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=p.distributed_optimizer,
                overlap_grad_reduce=False,
            ),
            module=model,
        )
        self.tconfig.finalize_model_grads_func = finalize_model_grads
        self.tconfig.no_sync_func = ddp.no_sync
        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=t.lr,
                weight_decay=t.weight_decay,
                adam_beta1=t.betas[0],
                adam_beta2=t.betas[1],
                adam_eps=1e-8,
                clip_grad=t.grad_clip,
                bf16=self.dtype == torch.bfloat16,
                params_dtype=self.dtype,
                use_distributed_optimizer=p.distributed_optimizer,
            ),
            [ddp],
        )
        return ddp, optimizer

    # -- interface --------------------------------------------------------------------------

    @property
    def forward_module(self) -> torch.nn.Module:
        return self.model

    @property
    def dp_rank(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_rank()

    @property
    def dp_size(self) -> int:
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_world_size()

    def _run(self, feeds: Sequence[Feed], *, forward_only: bool, loss_func) -> list[Any]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator: Iterator[Feed], model):
            feed = next(data_iterator)
            device = self.ctx.torch_device
            ids = feed.input_ids.to(device)
            positions = torch.arange(ids.shape[1], device=device).unsqueeze(0).expand_as(ids)
            extra = None
            if feed.context is not None:
                extra = {"context": self.stage.rows_reaching_stage(feed.context).to(device)}
            # No attention mask: rows are right-padded and attention is causal, so content
            # positions never see padding (padding positions are masked out of every loss).
            output = model(ids, positions, None, extra_block_kwargs=extra)
            return output, partial(loss_func, feed)

        with self.device_scope():
            return get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(feeds),
                model=[self.model],
                num_microbatches=len(feeds),
                seq_length=max(f.input_ids.shape[1] for f in feeds),
                micro_batch_size=max(f.input_ids.shape[0] for f in feeds),
                forward_only=forward_only,
            )

    def _train_loss(self, feed: Feed, logits: Tensor):
        # Pair rows may have widened the micro-batch: the LM rows' own width is the label width.
        width = feed.batch.labels.shape[1]
        logits = logits[:, :width, : self.shape.vocab].float()
        lm = lm_loss(logits, feed.batch.to(logits.device))
        weight = self.stage.lm_weight if self.stage else 1.0
        return weight * lm, {"loss_lm": lm.detach()}

    def train_step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        n = len(micro_batches)
        if self.stage is not None:
            self.stage.begin_step(n)
            feeds = [
                Feed(*self.stage.with_pairs(mb, i, self.dp_rank, self.dp_size), mb)
                for i, mb in enumerate(micro_batches)
            ]
        else:
            feeds = [Feed(mb.input_ids, None, mb) for mb in micro_batches]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._run(feeds, forward_only=False, loss_func=self._train_loss)
        with self.device_scope():
            _, grad_norm, _ = self.optimizer.step()
        if self.stage is not None:
            self.stage.end_step()
            if self.method.cfg.vector_mode == "running":
                self._sync_method_stats()
        return self._step_result(outputs, n, grad_norm)

    def _step_result(self, outputs: list[dict], n: int, grad_norm) -> StepResult:
        """Every logged scalar in one all-reduce: LM terms from the last stage, contrastive
        terms from the stages that own band layers, each counted once per TP group."""
        band = list(range(self.stage.f, self.stage.b)) if self.stage else []
        values = torch.zeros(1 + len(band), dtype=torch.float64)
        if self.tp_rank == 0:
            if self.pp_rank == self.pp - 1:
                values[0] = sum(float(o["loss_lm"]) for o in outputs)
            if self.stage is not None:
                for (_, layer), value in self.stage.mcl_values.items():
                    values[1 + band.index(layer)] += value
        dist.all_reduce(values)
        values /= n * self.dp_size
        lm = values[0].item()
        metrics = {"loss_lm": lm}
        loss = lm
        if self.stage is not None:
            mcl = values[1:].mean().item()
            cfg = self.method.cfg
            loss = cfg.alpha * lm + cfg.beta * mcl
            metrics["loss_mcl"] = mcl
            metrics.update(
                {f"loss_mcl/L{layer}": values[1 + j].item() for j, layer in enumerate(band)}
            )
        return StepResult(
            loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), metrics=metrics
        )

    @torch.no_grad()
    def forward_logits(self, batch: Batch) -> Tensor:
        """Full logits on every rank: computed on the last stage, broadcast over the pipeline."""
        from megatron.core import parallel_state as ps

        context = self.stage.lm_rows(batch, 0) if self.stage else None
        captured: list[Tensor] = []

        def keep(feed: Feed, logits: Tensor):
            captured.append(logits[..., : self.shape.vocab].float())
            return logits.new_zeros(()), {}

        self.model.eval()
        self._run([Feed(batch.input_ids, context, batch)], forward_only=True, loss_func=keep)
        self.model.train()
        b, t = batch.input_ids.shape
        device = self.ctx.torch_device
        logits = captured[0] if captured else torch.empty(b, t, self.shape.vocab, device=device)
        if self.pp > 1:
            dist.broadcast(
                logits,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return logits

    @torch.no_grad()
    def prefill(self, batch: Batch, max_new_tokens: int):
        """Cached greedy decoding through every stage (`parallel/megatron_generate.py`)."""
        from parallel import megatron_generate

        return megatron_generate.prefill(self, batch, max_new_tokens)

    @torch.no_grad()
    def decode(self, state, tokens: Tensor) -> Tensor:
        from parallel import megatron_generate

        return megatron_generate.decode(self, state, tokens)

    @torch.no_grad()
    def hidden_states(self, batch: Batch) -> list[Tensor]:
        """Every layer's output on every rank: each stage records its own layers (after the
        method's shift, as transformers reports them; the last entry after the final norm),
        then the stages exchange them."""
        from megatron.core import parallel_state as ps

        module = self.model.module
        captured: dict[int, Tensor] = {}

        def record(index: int):
            def hook(_module, _args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                if self.recipe.parallel.sequence_parallel:
                    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                    hidden = gather_from_sequence_parallel_region(hidden)
                captured[index] = hidden.transpose(0, 1).float().cpu()

            return hook

        modules = [(layer.layer_number, layer) for layer in module.decoder.layers]
        if module.pre_process:
            modules.insert(0, (0, module.embedding))
        if module.post_process:  # registered last: replaces layer L's entry with the normed one
            modules.append((self.shape.layers, module.decoder.final_layernorm))
        handles = [m.register_forward_hook(record(i)) for i, m in modules]
        try:
            context = self.stage.lm_rows(batch, 0) if self.stage else None
            self.model.eval()
            self._run(
                [Feed(batch.input_ids, context, batch)],
                forward_only=True,
                loss_func=lambda feed, out: (out.new_zeros(()), {}),
            )
            self.model.train()
        finally:
            for handle in handles:
                handle.remove()
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, captured, group=ps.get_pipeline_model_parallel_group())
        merged = {i: t for part in parts for i, t in part.items()}
        return [merged[i].to(self.ctx.torch_device) for i in range(self.shape.layers + 1)]

    # -- method state -----------------------------------------------------------------------

    def prepare_method(self, examples: Sequence[Example], batch_size: int) -> None:
        """ShifCon precompute: the vector samples through the frozen model, unshifted, each DP
        rank a share; every stage records its own layers; one all-reduce per stage."""
        if self.stage is None:
            return
        batches = self.method.vector_batches(examples, batch_size)
        pad = self.method.tokenizer.pad_token_id
        self.stage.stats = self.stage.empty_stats()
        self.model.eval()
        for group in batches[self.dp_rank :: self.dp_size]:
            ids, context = self.stage.probe_rows(group, pad)
            self._run(
                [Feed(ids, context, None)],
                forward_only=True,
                loss_func=lambda feed, out: (out.new_zeros(()), {}),
            )
        self.model.train()
        self.stage.reduce_stats()
        self._sync_method_stats()

    def _sync_method_stats(self) -> None:
        """The method's full statistics (every band layer) from the stages that own them: what
        checkpoints, exports and metrics read."""
        from megatron.core import parallel_state as ps

        from methods.shifcon.megatron import merge_stage_stats

        mine = self.stage.stats.state_dict() if self.stage.stats is not None else None
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, mine, group=ps.get_pipeline_model_parallel_group())
        self.method.stats = merge_stage_stats(parts, self.method.languages)

    def restore_method(self, state: dict[str, Any]) -> None:
        self.method.load_state_dict(state)
        if self.stage is not None and self.method.stats is not None:
            self.stage.take_stats(self.method.stats)

    # -- checkpoints and export -------------------------------------------------------------

    def param_counts(self) -> tuple[int, int]:
        first = self.pp_rank == 0
        local = sum(
            p.numel()
            for p in self.model.parameters()
            if first or not getattr(p, "shared", False)  # the last stage's tied-embedding copy
        )
        return local, self.shape.num_params

    def _sharded_state(self, loading: bool) -> dict[str, Any]:
        model_state = self.model.module.sharded_state_dict()
        return {
            "model": model_state,
            "optimizer": self.optimizer.sharded_state_dict(model_state, is_loading=loading),
        }

    def save(self, root: Path, tag: str, client_state: dict[str, Any]) -> None:
        from megatron.core import dist_checkpointing

        directory = root / tag
        if self.ctx.is_rank0:
            directory.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        with self.device_scope():
            dist_checkpointing.save(self._sharded_state(loading=False), str(directory))
        if self.ctx.is_rank0:  # after: megatron refuses to write into a non-empty directory
            torch.save(client_state, directory / CLIENT_STATE)
        dist.barrier()

    def load(self, root: Path, tag: str) -> dict[str, Any]:
        from megatron.core import dist_checkpointing

        directory = root / tag
        with self.device_scope():
            state = dist_checkpointing.load(self._sharded_state(loading=True), str(directory))
            self.model.module.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        return torch.load(directory / CLIENT_STATE, weights_only=False)

    def method_state(self) -> dict[str, Any]:
        if self.stage is not None:
            self._sync_method_stats()
        return self.method.state_dict()

    def export(self, directory: Path) -> None:
        """Each stage's TP group gathers its shards; its TP rank 0 writes that stage's
        safetensors file; rank 0 writes the index and config. No rank holds the whole model."""
        from megatron.core import parallel_state as ps
        from safetensors.torch import save_file

        if self.stage is not None:
            self._sync_method_stats()
        module = self.model.module
        local = {k: v.detach() for k, v in module.state_dict().items() if "_extra_state" not in k}
        tp_group = ps.get_tensor_model_parallel_group()
        shards: list[dict[str, Tensor]] = [{} for _ in range(self.tp)]
        for name in sorted(local):
            parts = [torch.empty_like(local[name]) for _ in range(self.tp)]
            dist.all_gather(parts, local[name].contiguous(), group=tp_group)
            for r, part in enumerate(parts):
                shards[r][name] = part.cpu()
        hf = mcore_to_hf(
            shards,
            self.shape,
            self.layers,
            pre_process=self.pp_rank == 0,
            post_process=self.pp_rank == self.pp - 1,
        )
        filename = f"model-{self.pp_rank + 1:05d}-of-{self.pp:05d}.safetensors"
        names: list[Any] = [None] * self.pp
        dist.all_gather_object(names, sorted(hf), group=ps.get_pipeline_model_parallel_group())
        if self.tp_rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(hf, str(directory / filename), metadata={"format": "pt"})
        if self.ctx.is_rank0:
            weight_map = {
                name: f"model-{stage + 1:05d}-of-{self.pp:05d}.safetensors"
                for stage, stage_names in enumerate(names)
                for name in stage_names
            }
            index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
            config = self.hf_config.to_dict()
            config["dtype"] = str(self.dtype).removeprefix("torch.")
            self.hf_config.__class__.from_dict(config).save_pretrained(directory)
        dist.barrier()
