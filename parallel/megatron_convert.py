"""Hugging Face <-> megatron-core weights for Llama-family decoders, one stage and TP rank at a
time, so that no process ever holds more than its own shard (plus one layer while converting).

Layouts (megatron-core local spec):

- ``linear_qkv``: per query group g, the group's q heads, then its k head, then its v head
  (``[groups, q_per_group + 2, head_dim, hidden]`` flattened); TP splits whole groups.
- ``linear_fc1``: ``[gate; up]``; under TP each rank holds ``[gate_r; up_r]``.
- ``linear_proj`` and ``linear_fc2``: row-parallel (TP splits the input dimension).
- embedding / output layer: vocab-parallel, the vocab padded with zero rows to a multiple of TP.

mbridge does the same mapping, but for Transformer Engine layer names and with CUDA-only
tensor moves; the local spec that also runs on CPU needs this small converter instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from parallel.megatron_model import DecoderShape

Getter = Callable[[str], Tensor]  # HF tensor name -> tensor (read lazily from safetensors)


def _hf_layer(i: int) -> str:
    return f"model.layers.{i - 1}."  # HF counts layers from 0, megatron's layer_number from 1


def _pad_vocab(weight: Tensor, rows: int) -> Tensor:
    if weight.shape[0] == rows:
        return weight
    pad = weight.new_zeros(rows - weight.shape[0], *weight.shape[1:])
    return torch.cat([weight, pad])


def pack_qkv(q: Tensor, k: Tensor, v: Tensor, shape: DecoderShape) -> Tensor:
    """HF q/k/v projections (weights or biases) -> megatron's grouped QKV layout."""
    g, d = shape.kv_heads, shape.head_dim
    per = shape.heads // g
    rest = q.shape[1:]
    return torch.cat(
        [q.reshape(g, per, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)],
        dim=1,
    ).reshape(g * (per + 2) * d, *rest)


def unpack_qkv(qkv: Tensor, shape: DecoderShape) -> tuple[Tensor, Tensor, Tensor]:
    g, d = shape.kv_heads, shape.head_dim
    per = shape.heads // g
    rest = qkv.shape[1:]
    grouped = qkv.reshape(g, per + 2, d, *rest)
    q, k, v = grouped.split([per, 1, 1], dim=1)
    return (
        q.reshape(g * per * d, *rest),
        k.reshape(g * d, *rest),
        v.reshape(g * d, *rest),
    )


def hf_to_mcore(
    get: Getter,
    shape: DecoderShape,
    layers: Sequence[int],
    *,
    tp: int,
    tp_rank: int,
    pre_process: bool,
    post_process: bool,
) -> dict[str, Tensor]:
    """This stage's and TP rank's megatron state dict (local layer indices) from HF tensors."""
    out: dict[str, Tensor] = {}

    def shard(t: Tensor, dim: int) -> Tensor:
        return t.chunk(tp, dim=dim)[tp_rank].clone()

    vocab_rows = shape.padded_vocab(tp)
    if pre_process:
        embed = _pad_vocab(get("model.embed_tokens.weight"), vocab_rows)
        out["embedding.word_embeddings.weight"] = shard(embed, 0)
    for j, i in enumerate(layers):
        hf, mc = _hf_layer(i), f"decoder.layers.{j}."
        attn = hf + "self_attn."
        out[mc + "input_layernorm.weight"] = get(hf + "input_layernorm.weight").clone()
        qkv = pack_qkv(
            get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"),
            shape,
        )  # fmt: skip
        out[mc + "self_attention.linear_qkv.weight"] = shard(qkv, 0)
        if shape.qkv_bias:
            bias = pack_qkv(
                get(attn + "q_proj.bias"), get(attn + "k_proj.bias"), get(attn + "v_proj.bias"),
                shape,
            )  # fmt: skip
            out[mc + "self_attention.linear_qkv.bias"] = shard(bias, 0)
        out[mc + "self_attention.linear_proj.weight"] = shard(get(attn + "o_proj.weight"), 1)
        out[mc + "pre_mlp_layernorm.weight"] = get(hf + "post_attention_layernorm.weight").clone()
        gate = get(hf + "mlp.gate_proj.weight").chunk(tp, dim=0)[tp_rank]
        up = get(hf + "mlp.up_proj.weight").chunk(tp, dim=0)[tp_rank]
        out[mc + "mlp.linear_fc1.weight"] = torch.cat([gate, up]).clone()
        out[mc + "mlp.linear_fc2.weight"] = shard(get(hf + "mlp.down_proj.weight"), 1)
    if post_process:
        out["decoder.final_layernorm.weight"] = get("model.norm.weight").clone()
        if not shape.tied:
            head = _pad_vocab(get("lm_head.weight"), vocab_rows)
            out["output_layer.weight"] = shard(head, 0)
        elif not pre_process:  # the last stage keeps its own copy of the tied embedding
            embed = _pad_vocab(get("model.embed_tokens.weight"), vocab_rows)
            out["output_layer.weight"] = shard(embed, 0)
    return out


def mcore_to_hf(
    tp_shards: Sequence[dict[str, Tensor]],
    shape: DecoderShape,
    layers: Sequence[int],
    *,
    pre_process: bool,
    post_process: bool,
) -> dict[str, Tensor]:
    """HF tensors of one stage from the state dicts of all its TP ranks (in TP-rank order)."""

    def cat(name: str, dim: int) -> Tensor:
        return torch.cat([s[name] for s in tp_shards], dim=dim)

    out: dict[str, Tensor] = {}
    if pre_process:
        out["model.embed_tokens.weight"] = cat("embedding.word_embeddings.weight", 0)[: shape.vocab]
    for j, i in enumerate(layers):
        hf, mc = _hf_layer(i), f"decoder.layers.{j}."
        attn = hf + "self_attn."
        out[hf + "input_layernorm.weight"] = tp_shards[0][mc + "input_layernorm.weight"]
        q, k, v = unpack_qkv(cat(mc + "self_attention.linear_qkv.weight", 0), shape)
        out.update(
            {attn + "q_proj.weight": q, attn + "k_proj.weight": k, attn + "v_proj.weight": v}
        )
        if shape.qkv_bias:
            q, k, v = unpack_qkv(cat(mc + "self_attention.linear_qkv.bias", 0), shape)
            out.update({attn + "q_proj.bias": q, attn + "k_proj.bias": k, attn + "v_proj.bias": v})
        out[attn + "o_proj.weight"] = cat(mc + "self_attention.linear_proj.weight", 1)
        out[hf + "post_attention_layernorm.weight"] = tp_shards[0][mc + "pre_mlp_layernorm.weight"]
        halves = [s[mc + "mlp.linear_fc1.weight"].chunk(2, dim=0) for s in tp_shards]
        out[hf + "mlp.gate_proj.weight"] = torch.cat([h[0] for h in halves])
        out[hf + "mlp.up_proj.weight"] = torch.cat([h[1] for h in halves])
        out[hf + "mlp.down_proj.weight"] = cat(mc + "mlp.linear_fc2.weight", 1)
    if post_process:
        out["model.norm.weight"] = tp_shards[0]["decoder.final_layernorm.weight"]
        if not shape.tied:
            out["lm_head.weight"] = cat("output_layer.weight", 0)[: shape.vocab]
    return {name: t.contiguous() for name, t in out.items()}
