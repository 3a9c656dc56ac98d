"""Megatron-core adapter: tensor- and pipeline-parallel training behind the Engine interface.

The recipe's data, method and tracking sections are the same as for DeepSpeed; this adapter only
decides where layers live (parallel_state: TP x PP x DP), how a micro-batch crosses the pipeline
(`parallel/megatron_schedule.py`: megatron-core's own schedules), and which group reduces what.
A Hugging Face checkpoint goes in and a Hugging Face directory comes out
(`parallel/megatron_io.py`); checkpoints in between are megatron-core distributed checkpoints,
which reload into any TP/PP/DP layout (with the distributed optimizer: another DP size only,
see `_sharded_state`). The method runs as its `MegatronStage` (methods/base.py,
chosen by methods/registry.py): this file calls the stage's hooks and never names a method.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from config.errors import UserError
from config.schema import Recipe
from data.formatting import Batch, Example
from methods.base import Method, StageContext
from methods.registry import megatron_stage_class
from model.backbone import ResolvedBackbone
from parallel import megatron_cpu
from parallel.distributed import DistContext
from parallel.ds_config import resolve_precision
from parallel.engine import Engine, StepResult
from parallel.megatron_io import (
    SafetensorsReader,
    StagePlace,
    export_hf_weights,
    load_hf_weights,
)
from parallel.megatron_model import (
    DecoderShape,
    build_gpt_model,
    layout_errors,
    resolve_attention,
    stage_layers,
    summary,
    transformer_config,
    transformer_engine_available,
)
from parallel.megatron_schedule import (
    Feed,
    Pipeline,
    no_loss,
    record_layer_outputs,
    vocab_parallel_lm_loss,
)
from parallel.safe_load import load_tensors

CLIENT_STATE = "polyshift_client_state.pt"

# megatron-core announces every optional kernel it falls back from; the local spec is a choice.
for _message in (
    r".*(Transformer Engine|Apex).* not installed",
    r"full scope is deprecated",
    r"When using async grad allreduce",
):
    warnings.filterwarnings("ignore", message=_message, category=UserWarning)


def _per_layer_keys_(state: dict[str, Any]) -> None:
    """Key the optimizer state of stacked decoder-layer tensors per layer, in place.

    megatron checkpoints a weight of every layer as one tensor with a leading layer axis, and
    torch's checkpoint planner requires the saved shards to fill each tensor. A method that
    trains only some layers (Lens) has optimizer state for those only: keyed per (global)
    layer, every key is whole again, and still independent of the pipeline layout."""
    from dataclasses import replace

    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    def per_layer(value):
        if isinstance(value, ShardedTensorFactory):  # e.g. SwiGLU's fc1 (two halves): its parts
            build = value.build_fn

            def built(*args, _build=build):
                return dict_list_map_inplace(per_layer, _build(*args))

            return replace(value, build_fn=built)
        n = getattr(value, "prepend_axis_num", 0)
        if not isinstance(value, ShardedTensor) or n == 0 or value.flattened_range is not None:
            return value
        fragments = value.axis_fragmentations
        return replace(
            value,
            key=value.key + "/layer" + "_".join(str(o) for o in value.global_offset[:n]),
            global_shape=(1,) * n + tuple(value.global_shape[n:]),
            global_offset=(0,) * n + tuple(value.global_offset[n:]),
            axis_fragmentations=None if fragments is None else (1,) * n + tuple(fragments[n:]),
        )

    dict_list_map_inplace(per_layer, state)


class MegatronEngine(Engine):
    def __init__(
        self, recipe: Recipe, ctx: DistContext, backbone: ResolvedBackbone, method: Method
    ) -> None:
        from megatron.core import parallel_state as ps
        from transformers import AutoConfig

        self.ctx, self.method, self.recipe = ctx, method, recipe
        stage_class = megatron_stage_class(method.name)  # a recipe error before any work
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
        requested = getattr(p, "attention", "auto")
        try:
            self.attention = resolve_attention(
                requested, self.on_gpu, self.on_gpu and transformer_engine_available()
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        te = self.attention == "transformer_engine"
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
            self.place = StagePlace(
                self.shape, self.layers, self.tp, self.tp_rank, self.pp, self.pp_rank, te
            )
            self.stage = stage_class(
                method,
                StageContext(
                    layers=self.layers,
                    hidden_size=self.shape.hidden,
                    dp_rank=ps.get_data_parallel_rank(),
                    dp_size=ps.get_data_parallel_world_size(),
                    dp_group=ps.get_data_parallel_group(),
                    pp_group=ps.get_pipeline_model_parallel_group(),
                    pp_size=self.pp,
                    sequence_parallel=p.sequence_parallel,
                    device=ctx.torch_device,
                ),
            )
            model = build_gpt_model(
                self.shape,
                self.tconfig,
                tp=self.tp,
                pp_rank=self.pp_rank,
                pp=self.pp,
                layer_class_for=self.stage.layer_class_for,
                transformer_engine=te,
            )
            load_hf_weights(model, SafetensorsReader(Path(backbone.path)), self.place)
            if self.on_gpu:
                model.cuda(torch.cuda.current_device())
            self.stage.attach(model)
            self.model, self.optimizer = self._wrap(model, recipe)
            self.pipeline = Pipeline(
                self.model,
                self.stage,
                ctx.torch_device,
                self.device_scope,
                seq_multiple=self.tp if p.sequence_parallel else 1,
            )
        self._lm_scale = 1.0  # see `_train_loss`
        self.config = {
            "engine": "megatron",
            **summary(self.shape, self.tp, self.pp, self.dp_size),
            "dtype": str(self.dtype),
            "sequence_parallel": p.sequence_parallel,
            "distributed_optimizer": p.distributed_optimizer,
            "recompute": recipe.model.gradient_checkpointing,
            "attention": self.attention,
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

    def _train_loss(self, feed: Feed, logits: Tensor):
        """Vocab-parallel: `logits` is this TP rank's ``[B, W, V/TP]`` slice, never gathered.

        The schedule divides every loss by its number of micro-batches, side rows' included:
        `_lm_scale` (their count over the LM micro-batches') gives the LM term its share back.
        A side micro-batch has no LM loss (a zero that keeps the backward's graph)."""
        if feed.batch is None:
            return logits.sum() * 0.0, {}
        lm = vocab_parallel_lm_loss(logits, feed.batch, self.shape.vocab)
        return self.stage.lm_term(lm) * self._lm_scale, {"loss_lm": lm.detach()}

    def _train_feeds(self, micro_batches: Sequence[Batch]) -> list[Feed]:
        """Each LM micro-batch, then the method's side rows for it (if any)."""
        feeds = []
        for i, mb in enumerate(micro_batches):
            feeds.append(Feed(*self.stage.train_rows(mb, i), mb))
            side = self.stage.side_rows(i)
            if side is not None:
                feeds.append(Feed(*side, None))
        self._lm_scale = len(feeds) / len(micro_batches)
        return feeds

    def train_step(self, micro_batches: Sequence[Batch], lr: float) -> StepResult:
        n = len(micro_batches)
        self.stage.begin_step(n)
        feeds = self._train_feeds(micro_batches)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self.pipeline.run(feeds, forward_only=False, loss_func=self._train_loss)
        with self.device_scope():
            _, grad_norm, _ = self.optimizer.step()
        self.stage.end_step()
        return self._step_result(outputs, n, grad_norm)

    def _step_result(self, outputs: list[dict], n: int, grad_norm) -> StepResult:
        """Every logged scalar in one all-reduce: LM terms from the last stage, the method's
        from the stages that own them, each counted once per TP group."""
        extra = self.stage.step_values()
        values = torch.zeros(1 + len(extra), dtype=torch.float64)
        if self.tp_rank == 0:
            if self.pp_rank == self.pp - 1:
                values[0] = sum(float(o["loss_lm"]) for o in outputs if "loss_lm" in o)
            values[1:] = extra
        dist.all_reduce(values)
        values /= n * self.dp_size
        loss, metrics = self.stage.step_result(values[0].item(), values[1:])
        return StepResult(
            loss=loss, grad_norm=None if grad_norm is None else float(grad_norm), metrics=metrics
        )

    def _eval_feed(self, batch: Batch) -> Feed:
        return Feed(batch.input_ids, self.stage.eval_context(batch), batch)

    @torch.no_grad()
    def forward_logits(self, batch: Batch) -> Tensor:
        """Full logits on every rank: computed on the last stage, broadcast over the pipeline."""

        captured: list[Tensor] = []

        def keep(feed: Feed, logits: Tensor):
            captured.append(logits[:, : feed.input_ids.shape[1], : self.shape.vocab].float())
            return logits.new_zeros(()), {}

        self.pipeline.forward_only(self._eval_feed(batch), keep, gather_logits=True)
        return self._from_last_stage(captured, (*batch.input_ids.shape, self.shape.vocab))

    def _from_last_stage(self, captured: list[Tensor], shape: tuple[int, ...]) -> Tensor:
        """What the last stage captured (`shape`), broadcast to every stage of the pipeline."""
        from megatron.core import parallel_state as ps

        device = self.ctx.torch_device
        logits = captured[0] if captured else torch.empty(*shape, device=device)
        if self.pp > 1:
            dist.broadcast(
                logits,
                src=ps.get_pipeline_model_parallel_last_rank(),
                group=ps.get_pipeline_model_parallel_group(),
            )
        return logits

    @torch.no_grad()
    def last_logits(self, batch: Batch) -> Tensor:
        """``[B, V]`` at each row's last position on every rank: only those rows of the logits
        are gathered over TP (what decoding without a cache needs)."""
        from megatron.core import parallel_state as ps

        captured: list[Tensor] = []
        last = batch.attention_mask.sum(dim=1) - 1

        def keep(feed: Feed, logits: Tensor):
            rows = torch.arange(logits.shape[0], device=logits.device)
            mine = logits[rows, last.to(logits.device)].float().contiguous()
            parts = [torch.empty_like(mine) for _ in range(self.tp)]
            dist.all_gather(parts, mine, group=ps.get_tensor_model_parallel_group())
            captured.append(torch.cat(parts, dim=-1)[:, : self.shape.vocab])
            return logits.new_zeros(()), {}

        self.pipeline.forward_only(self._eval_feed(batch), keep)
        return self._from_last_stage(captured, (batch.input_ids.shape[0], self.shape.vocab))

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
        method's forward, as transformers reports them; the last entry after the final norm),
        then the stages exchange them."""
        from megatron.core import parallel_state as ps

        captured, handles = record_layer_outputs(
            self.model.module, self.shape.layers, self.recipe.parallel.sequence_parallel
        )
        try:
            self.pipeline.forward_only(self._eval_feed(batch))
        finally:
            for handle in handles:
                handle.remove()
        parts: list[Any] = [None] * self.pp
        dist.all_gather_object(parts, captured, group=ps.get_pipeline_model_parallel_group())
        merged = {i: t for part in parts for i, t in part.items()}
        width = batch.input_ids.shape[1]  # without the sequence-parallel padding
        return [
            merged[i][:, :width].to(self.ctx.torch_device) for i in range(self.shape.layers + 1)
        ]

    # -- method state -----------------------------------------------------------------------

    def prepare_method(self, examples: Sequence[Example], batch_size: int) -> None:
        def forward(ids: Tensor, context: Tensor | None) -> None:
            self.pipeline.forward_only(Feed(ids, context, None), no_loss)

        self.stage.prepare(forward, examples, batch_size)

    def restore_method(self, state: dict[str, Any]) -> None:
        self.stage.restore(state)

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
        # The distributed optimizer's default format ("fully_sharded_model_space", deprecated)
        # is refused by megatron-core 0.16's own checkpointing (flattened_range) on any device;
        # "fully_reshardable" (any layout) fails to load torch Adam's per-parameter step
        # (KeyError 'step', measured on CPU). "dp_reshardable": fully parallel, reloads into
        # another DP size but not another TP/PP.
        metadata = {"distrib_optim_sharding_type": "dp_reshardable"}
        optimizer = self.optimizer.sharded_state_dict(
            model_state, is_loading=loading, metadata=metadata
        )
        if not all(p.requires_grad for p in self.model.module.parameters()):
            _per_layer_keys_(optimizer)
        return {"model": model_state, "optimizer": optimizer}

    def _materialise_optimizer_state(self) -> None:
        """The distributed optimizer describes its state for loading from the live torch Adam
        state, which exists only after a first step (without Apex or Transformer Engine, e.g.
        on CPU, it asserts on the missing step count): one zero-gradient step creates it, as
        megatron-core does before its own FSDP loads. Every value it touches is then loaded."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
                opt._init_optimizer_states_with_dummy_values()

    def _restore_adam_steps(self) -> None:
        """After a distributed-optimizer load of torch's Adam (no Apex or TE), megatron-core
        restores the step count into the parameter groups only, keeping the per-parameter
        ``step`` of the state it found (the zero-gradient step's): each parameter gets the
        loaded count, in a tensor of its own (Adam increments them one by one)."""
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not isinstance(opt, DistributedOptimizer):
                continue
            for group in opt.optimizer.param_groups:
                for param in group["params"]:
                    state = opt.optimizer.state.get(param, {})
                    if "step" in group and isinstance(state.get("step"), Tensor):
                        state["step"] = torch.full_like(state["step"], float(group["step"]))

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
            self._materialise_optimizer_state()
            state = dist_checkpointing.load(self._sharded_state(loading=True), str(directory))
            self.model.module.load_state_dict(state["model"])
            with torch.no_grad():  # the distributed optimizer copies into its leaf main params
                self.optimizer.load_state_dict(state["optimizer"])
            self._restore_adam_steps()
        return load_tensors(directory / CLIENT_STATE)

    def method_state(self) -> dict[str, Any]:
        self.stage.sync_state()
        return self.method.state_dict()

    def export(self, directory: Path) -> None:
        """Each stage's TP group gathers its shards; no rank holds the whole model."""
        from megatron.core import parallel_state as ps

        self.stage.sync_state()
        export_hf_weights(
            self.model.module,
            directory,
            self.place,
            tp_group=ps.get_tensor_model_parallel_group(),
            pp_group=ps.get_pipeline_model_parallel_group(),
            hf_config=self.hf_config,
            dtype=self.dtype,
            is_rank0=self.ctx.is_rank0,
        )
