"""The shape of a Llama-family decoder and the table of known ones: the one source of parameter
counts (the memory planner's and the megatron engine's `DecoderShape.num_params` alike)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from config.errors import UserError


class UnknownArch(UserError):
    """A backbone whose shape is neither local nor in the table (the planner needs --arch)."""


@dataclass(frozen=True)
class Arch:
    """The shape of a Llama-family decoder: all that memory and FLOP counts need."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied_embeddings: bool = False
    head_dim: int | None = None  # None: hidden // heads
    qkv_bias: bool = False  # Qwen2

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_hidden(self) -> int:
        return self.heads * self.head_size

    @property
    def kv_hidden(self) -> int:
        return self.kv_heads * self.head_size

    @property
    def layer_params(self) -> int:
        """q, k, v, o; the SwiGLU MLP; two norms; the QKV bias where there is one."""
        h, q, kv = self.hidden, self.q_hidden, self.kv_hidden
        bias = q + 2 * kv if self.qkv_bias else 0
        return (q + 2 * kv) * h + q * h + 3 * h * self.intermediate + 2 * h + bias

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        heads = 1 if self.tied_embeddings else 2
        return self.layers * self.layer_params + heads * self.embedding_params + self.hidden

    @property
    def largest_layer_params(self) -> int:
        """Largest single module (DeepSpeed's `largest_layer_params`): embedding or a linear."""
        return max(self.embedding_params, self.hidden * self.intermediate)

    def layer_forward_flops(self, tokens: int, seq: int) -> float:
        """One decoder layer's forward: 2 FLOPs per weight per token + attention (QK^T, AV)."""
        attention = 2 * 2 * tokens * seq * self.hidden  # causal halves it; we keep the full bound
        return 2.0 * self.layer_params * tokens + attention

    def head_forward_flops(self, tokens: int) -> float:
        return 2.0 * self.embedding_params * tokens

    def activation_bytes_per_token(self, eager_attention: bool = False, seq: int = 0) -> float:
        return sum(self.activation_parts(eager_attention, seq))

    def activation_parts(self, eager_attention: bool = False, seq: int = 0) -> tuple[float, float]:
        """(outside TP regions: the two norms, 16h; inside: q, k, v, attention out, MLP)."""
        h, i = self.hidden, self.intermediate
        inside = (
            4 * h + 4 * self.kv_hidden + 8 * i + (4 * self.heads * seq if eager_attention else 0)
        )
        return 16.0 * h, float(inside)


KNOWN_ARCHS: dict[str, Arch] = {
    "llama-7b": Arch("Llama-2-7B", 32, 4096, 11008, 32, 32, 32000),
    "llama-3-8b": Arch("Llama-3-8B", 32, 4096, 14336, 32, 8, 128256),
    "llama-13b": Arch("Llama-2-13B", 40, 5120, 13824, 40, 40, 32000),
    "llama-70b": Arch("Llama-2-70B", 80, 8192, 28672, 64, 8, 32000),
    "llama-3-70b": Arch("Llama-3-70B", 80, 8192, 28672, 64, 8, 128256),
}
_HUB_HINTS = [  # (substring of a lower-cased hub id, arch key): most specific first
    ("llama-3-70b", "llama-3-70b"),
    ("llama-3.1-70b", "llama-3-70b"),
    ("llama-3-8b", "llama-3-8b"),
    ("llama-3.1-8b", "llama-3-8b"),
    ("llama-2-70b", "llama-70b"),
    ("llama-2-13b", "llama-13b"),
    ("llama-2-7b", "llama-7b"),
]


def arch_from_config(cfg: dict[str, Any], name: str) -> Arch:
    """The shape from a Hugging Face config.json (as a dict)."""
    heads = cfg["num_attention_heads"]
    model_type = cfg.get("model_type")
    head_dim = cfg.get("head_dim") or None
    if head_dim == cfg["hidden_size"] // heads:
        head_dim = None  # the default: the table's entries leave it out
    return Arch(
        name,
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["intermediate_size"],
        heads,
        cfg.get("num_key_value_heads") or heads,
        cfg["vocab_size"],
        bool(cfg.get("tie_word_embeddings", False)),
        head_dim=head_dim,
        qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
    )


def resolve_arch(recipe, arch: str | None = None) -> Arch:
    """--arch, else the backbone's local config.json, else the table by hub id."""
    if arch:
        if arch not in KNOWN_ARCHS:
            raise UnknownArch(f"--arch: unknown {arch!r}; known: {sorted(KNOWN_ARCHS)}")
        return KNOWN_ARCHS[arch]
    spec = recipe.model.backbone
    path = Path(spec).expanduser()
    if spec.startswith("embedded:") or path.suffix == ".gguf":
        from model.backbone import resolve_backbone

        path = resolve_backbone(recipe.model).path
    if (path / "config.json").is_file():
        return arch_from_config(json.loads((path / "config.json").read_text()), spec)
    lowered = spec.lower()
    for hint, key in _HUB_HINTS:
        if hint in lowered:
            return replace(KNOWN_ARCHS[key], name=f"{KNOWN_ARCHS[key].name} (table, {spec})")
    raise UnknownArch(f"model.backbone: {spec!r} is not local and not in the table; pass --arch")
