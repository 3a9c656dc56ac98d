"""One source of parameter counts: the planner's table, DecoderShape and the real HF model agree."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from parallel.arch import KNOWN_ARCHS, Arch, arch_from_config
from parallel.megatron_model import DecoderShape


def _hf_config(arch: Arch) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=arch.vocab,
        hidden_size=arch.hidden,
        intermediate_size=arch.intermediate,
        num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads,
        num_key_value_heads=arch.kv_heads,
        tie_word_embeddings=arch.tied_embeddings,
    )


def _hf_param_count(config) -> int:
    with torch.device("meta"):  # shapes only: a 70B model costs no memory
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("key", sorted(KNOWN_ARCHS))
def test_table_decoder_shape_and_hf_model_agree(key: str) -> None:
    arch = KNOWN_ARCHS[key]
    config = _hf_config(arch)
    shape = DecoderShape.from_hf(config)
    assert shape.arch.total_params == shape.num_params == arch.total_params
    assert arch_from_config(config.to_dict(), arch.name) == arch
    assert _hf_param_count(config) == arch.total_params


def test_qkv_bias_and_head_dim_are_counted() -> None:
    """Qwen2 (QKV bias, tied) and a head_dim that is not hidden/heads: the count follows HF."""
    qwen = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    )
    wide = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    for config in (qwen, wide):
        want = _hf_param_count(config)
        assert DecoderShape.from_hf(config).num_params == want
        assert arch_from_config(config.to_dict(), "x").total_params == want
