"""A megatron-core GPTModel built from a Hugging Face Llama-family config.

Llama, Mistral, Qwen2 (and SmolLM, a Llama) share one decoder: RMSNorm, SwiGLU, RoPE and
grouped-query attention, with tied or untied embeddings and, for Qwen2, a QKV bias. That shape
is read from the HF config once (`DecoderShape`); the megatron `TransformerConfig`, the layer
specs and the weight converter (`parallel/megatron_convert.py`) all start from it.

Layer specs are megatron-core's own: the local spec (unfused DotProductAttention: the only
attention of the installed megatron-core's local spec; what CPU runs use) or, on CUDA with
Transformer Engine importable, the TE spec (fused attention, norms fused into the following
linear); `parallel.attention` chooses (`resolve_attention`). A method's stage may swap the
layer class of chosen (global) layer numbers, which is how a method's own layers are placed on
whichever pipeline stage owns them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from parallel.arch import Arch

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")

# The TE spec fuses each pre-norm into the linear after it: the same tensor, another name.
TE_NORM_NAMES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


def transformer_engine_available() -> bool:
    """Whether megatron-core can build its Transformer Engine spec in this environment."""
    try:
        from megatron.core.extensions import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE
    except Exception:  # TE missing or broken: megatron-core raises several kinds
        return False
    return bool(HAVE_TE)


def resolve_attention(requested: str, on_gpu: bool, te_available: bool) -> str:
    """``parallel.attention`` -> the spec the engine builds: "local" or "transformer_engine".

    auto: Transformer Engine on CUDA when importable, else local (CPU always local)."""
    if requested == "local" or (requested == "auto" and not (on_gpu and te_available)):
        return "local"
    if requested == "auto" or (on_gpu and te_available):
        return "transformer_engine"
    why = "a CUDA device" if not on_gpu else "Transformer Engine (import transformer_engine)"
    raise ValueError(
        f"parallel.attention: transformer_engine needs {why}, which this process does not "
        "have; use auto or local"
    )


def _renamed(state: Mapping[str, Any], suffixes: Mapping[str, str]) -> dict[str, Any]:
    """`state` with each name ending in ``.<old>`` of `suffixes` ending in ``.<new>`` instead."""
    out = {}
    for name, value in state.items():
        for old, new in suffixes.items():
            if name.endswith("." + old):
                name = name[: -len(old)] + new
                break
        out[name] = value
    return out


def to_spec_names(state: Mapping[str, Any], transformer_engine: bool) -> dict[str, Any]:
    """Local-spec parameter names (what the converter speaks) -> the built spec's names."""
    return _renamed(state, TE_NORM_NAMES) if transformer_engine else dict(state)


def from_spec_names(state: Mapping[str, Any], transformer_engine: bool) -> dict[str, Any]:
    """The inverse of `to_spec_names`."""
    if not transformer_engine:
        return dict(state)
    return _renamed(state, {te: local for local, te in TE_NORM_NAMES.items()})


@dataclass(frozen=True)
class DecoderShape:
    model_type: str
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    eps: float
    rope_theta: float
    max_positions: int
    llama3_rope: dict[str, float] | None = None  # Llama 3.1-style frequency scaling

    @classmethod
    def from_hf(cls, config: Any) -> DecoderShape:
        """Read the decoder shape; refuse what this engine would silently get wrong."""
        model_type = getattr(config, "model_type", "?")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model.backbone: the megatron engine supports {SUPPORTED_MODEL_TYPES}, "
                f"got model_type {model_type!r}"
            )
        rope = dict(getattr(config, "rope_parameters", None) or {})
        legacy = getattr(config, "rope_scaling", None)
        if isinstance(legacy, dict):
            rope = {**legacy, **rope}
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rope_type not in ("default", "llama3"):
            raise ValueError(f"model.backbone: RoPE type {rope_type!r} is not supported")
        heads = config.num_attention_heads
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"model.backbone: activation {act!r} (need silu / SwiGLU)")
        if model_type == "llama" and getattr(config, "mlp_bias", False):
            raise ValueError("model.backbone: MLP biases are not supported")
        qkv_bias = model_type == "qwen2" or bool(getattr(config, "attention_bias", False))
        return cls(
            model_type=model_type,
            layers=config.num_hidden_layers,
            hidden=config.hidden_size,
            ffn=config.intermediate_size,
            heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            eps=float(config.rms_norm_eps),
            rope_theta=float(theta),
            max_positions=config.max_position_embeddings,
            llama3_rope=({"factor": float(rope["factor"])} if rope_type == "llama3" else None),
        )

    @property
    def arch(self) -> Arch:
        """The planner's view of this shape: the one definition of the parameter count."""
        return Arch(
            self.model_type,
            self.layers,
            self.hidden,
            self.ffn,
            self.heads,
            self.kv_heads,
            self.vocab,
            tied_embeddings=self.tied,
            head_dim=self.head_dim,
            qkv_bias=self.qkv_bias,
        )

    @property
    def num_params(self) -> int:
        """Parameters of the Hugging Face model (what the whole pipeline holds, once)."""
        return self.arch.total_params

    def padded_vocab(self, tp: int) -> int:
        """Vocab rows padded to a multiple of TP (megatron splits the vocab evenly)."""
        return math.ceil(self.vocab / tp) * tp


def layout_errors(layers: int, heads: int, kv_heads: int, tp: int, pp: int) -> list[str]:
    """What makes a TP/PP layout impossible for a decoder, as field-named messages."""
    errors = []
    if layers % pp:
        errors.append(f"parallel.pipeline_parallel: {pp} stages do not divide the {layers} layers")
    if heads % tp:
        errors.append(f"parallel.tensor_parallel: {tp} does not divide the {heads} attention heads")
    if kv_heads % tp:
        errors.append(f"parallel.tensor_parallel: {tp} does not divide the {kv_heads} KV heads")
    return errors


def transformer_config(
    shape: DecoderShape,
    *,
    tp: int,
    pp: int,
    dtype: torch.dtype,
    sequence_parallel: bool,
    recompute: bool,
    on_gpu: bool,
):
    """The megatron TransformerConfig for this shape and layout (no dropout: fine-tuning)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=shape.layers,
        hidden_size=shape.hidden,
        ffn_hidden_size=shape.ffn,
        num_attention_heads=shape.heads,
        num_query_groups=shape.kv_heads,
        kv_channels=shape.head_dim,
        layernorm_epsilon=shape.eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        # Micro-batches differ in length (length-bucketed batches) and a method's extra rows
        # may leave the batch part-way: stages exchange shapes with each activation.
        variable_seq_lengths=True,
        moe_token_dispatcher_type="alltoall",  # dense model; the default rejects the line above
        # Weights come from the HF checkpoint: no random init of a 70B model first.
        perform_initialization=False,
        use_cpu_initialization=not on_gpu,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
    )


def stage_layers(config, pp_rank: int) -> range:
    """Global 1-based decoder layer numbers that pipeline stage `pp_rank` owns."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    offset = get_transformer_layer_offset(config, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, pp_rank=pp_rank)
    return range(offset + 1, offset + count + 1)


LayerClassFor = Callable[[int], type | None]  # global layer number -> layer class (None: default)


class LocalRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm built from megatron's norm arguments, usable under sequence parallelism.

    megatron-core's local spec builds RMSNorm through `WrappedTorchNorm`, which refuses
    ``sequence_parallel`` (on any device: only Transformer Engine's and Apex's norms mark their
    weights). Under sequence parallelism each TP rank normalises a different slice of the
    sequence, so the weight's gradient is a partial sum: the ``sequence_parallel`` attribute is
    what `finalize_model_grads` reads to all-reduce it over the TP group."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused) -> None:
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def decoder_block_spec(
    config,
    pp_rank: int,
    layer_class_for: LayerClassFor | None = None,
    transformer_engine: bool = False,
):
    """megatron-core's block spec for this stage (local, or TE), with a method's layer classes
    swapped in at the global layer numbers it asks for."""
    from dataclasses import replace as dc_replace

    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    spec = get_gpt_decoder_block_spec(
        config, use_transformer_engine=transformer_engine, normalization="RMSNorm", pp_rank=pp_rank
    )
    numbers = stage_layers(config, pp_rank)
    specs = []
    for number, layer_spec in zip(numbers, spec.layer_specs, strict=True):
        submodules = layer_spec.submodules
        if not transformer_engine:  # TE's norms handle sequence parallelism themselves
            submodules = dc_replace(
                submodules, input_layernorm=LocalRMSNorm, pre_mlp_layernorm=LocalRMSNorm
            )
        cls = layer_class_for(number) if layer_class_for is not None else None
        specs.append(dc_replace(layer_spec, module=cls or layer_spec.module, submodules=submodules))
    if transformer_engine:
        return dc_replace(spec, layer_specs=specs)
    return dc_replace(spec, layer_specs=specs, layer_norm=LocalRMSNorm)


def build_gpt_model(
    shape: DecoderShape,
    config,
    *,
    tp: int,
    pp_rank: int,
    pp: int,
    layer_class_for: LayerClassFor | None = None,
    transformer_engine: bool = False,
):
    """This stage's GPTModel chunk (embedding on the first stage, head on the last)."""
    from megatron.core.models.gpt import GPTModel

    kwargs: dict[str, Any] = {}
    if shape.llama3_rope is not None:
        kwargs.update(rope_scaling=True, rope_scaling_factor=shape.llama3_rope["factor"])
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(
            config, pp_rank, layer_class_for, transformer_engine
        ),
        vocab_size=shape.padded_vocab(tp),
        max_sequence_length=shape.max_positions,
        pre_process=pp_rank == 0,
        post_process=pp_rank == pp - 1,
        share_embeddings_and_output_weights=shape.tied,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta)
        if float(shape.rope_theta).is_integer()
        else shape.rope_theta,
        parallel_output=True,  # logits split over the vocabulary: the loss is vocab-parallel
        **kwargs,
    )
    mark_tensor_parallel_weights(model)
    return model


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Mark the TP-split weights of megatron's local layers as split.

    megatron-core 0.16 sets ``tensor_model_parallel`` on a layer's weight only in the random
    initialisation that ``perform_initialization=False`` skips (weights come from the HF
    checkpoint): the gradient norm (and so clipping) then counted every split weight on TP
    rank 0 only, as if it were a replicated one (measured at TP=2 on SFT: 2.757 for 3.572)."""
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    split_dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}
    for module in model.modules():
        dim = next((d for cls, d in split_dim.items() if isinstance(module, cls)), None)
        weight = getattr(module, "weight", None)
        if dim is None or weight is None or getattr(weight, "tensor_model_parallel", False):
            continue
        set_tensor_model_parallel_attributes(weight, True, dim, 1)


def summary(shape: DecoderShape, tp: int, pp: int, dp: int) -> Mapping[str, Any]:
    """What --dry-run prints for the megatron engine."""
    return {
        "model_type": shape.model_type,
        "layers": shape.layers,
        "hidden": shape.hidden,
        "heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "tensor_parallel": tp,
        "pipeline_parallel": pp,
        "data_parallel": dp,
        "layers_per_stage": shape.layers // pp,
        "padded_vocab": shape.padded_vocab(tp),
    }
