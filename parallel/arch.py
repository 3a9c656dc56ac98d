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


# A decoder layer's linears (path inside the layer) as peft's target_modules name them.
LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class LoraShape:
    """LoRA adapters on a decoder (recipe `lora:`): what their memory depends on."""

    rank: int
    targets: tuple[str, ...]  # peft target_modules names, or ("all-linear",)
    layers: int | None = None  # adapted decoder layers; None: all
    dropout: bool = False  # a dropout on the adapter input keeps a copy of it (and a mask)

    def adapts(self, linear: str) -> bool:
        """peft's rule: a module matches a target that is its name or a dotted suffix of it."""
        if self.targets == ("all-linear",):
            return True
        return any(linear == t or linear.endswith("." + t) for t in self.targets)


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
    lora: LoraShape | None = None  # LoRA adapters: only they train (None: every weight)

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

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear of a decoder layer."""
        h, q, kv, i = self.hidden, self.q_hidden, self.kv_hidden, self.intermediate
        shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
        return dict(zip(LINEARS, shapes, strict=True))

    def _adapted(self) -> list[tuple[int, int]]:
        lora = self.lora
        return [s for name, s in self.linear_shapes().items() if lora and lora.adapts(name)]

    @property
    def lora_layers(self) -> int:
        return 0 if self.lora is None else min(self.lora.layers or self.layers, self.layers)

    @property
    def trainable_params(self) -> int:
        """What gets gradients and optimizer state: every weight, or with LoRA only the
        adapters, r * (in + out) per adapted linear (peft's A: r x in, B: out x r)."""
        if self.lora is None:
            return self.total_params
        per_layer = sum(self.lora.rank * (fin + fout) for fin, fout in self._adapted())
        return self.lora_layers * per_layer

    def lora_activation_bytes_per_token(self) -> float:
        """LoRA's own saved activations per token, averaged over the decoder layers: A's
        16-bit output (r) for B's gradient, and with dropout the dropped copy of each adapted
        input (2 bytes) and its mask (1 byte). A frozen base linear saves nothing for its
        weight; its input is kept for the adapter, as the base layer would have kept it."""
        if self.lora is None:
            return 0.0
        per_layer = sum(
            2 * self.lora.rank + (3 * fin if self.lora.dropout else 0) for fin, _ in self._adapted()
        )
        return per_layer * self.lora_layers / self.layers

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
        return 16.0 * h, float(inside) + self.lora_activation_bytes_per_token()


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


def lora_shape(section: Any) -> LoraShape | None:
    """The recipe's `lora:` section as a shape (None when LoRA is off or absent)."""
    if section is None or not section.enabled:
        return None
    targets = section.target_modules
    return LoraShape(
        rank=section.rank,
        targets=(targets,) if isinstance(targets, str) else tuple(targets),
        layers=None if section.layers is None else len(section.layers),
        dropout=section.dropout > 0,
    )


def with_lora(arch: Arch, section: Any) -> Arch:
    """``arch`` with the recipe's adapters; the name says so (the plan prints it)."""
    shape = lora_shape(section)
    if shape is None:
        return arch
    adapted = replace(arch, lora=shape)
    if not adapted.trainable_params:
        raise UserError(
            f"lora.target_modules: {list(shape.targets)} adapts none of a decoder layer's "
            f"linears ({', '.join(LINEARS)})"
        )
    note = (
        f"LoRA r={shape.rank} on {adapted.lora_layers}/{arch.layers} layers, "
        f"{adapted.trainable_params / 1e6:.2f}M trainable"
    )
    return replace(adapted, name=f"{arch.name} + {note}")


def resolve_arch(recipe, arch: str | None = None) -> Arch:
    """--arch, else the backbone's local config.json, else the table by hub id; with the
    recipe's LoRA adapters when it has them."""
    return with_lora(_resolve_shape(recipe, arch), getattr(recipe, "lora", None))


def _resolve_shape(recipe, arch: str | None) -> Arch:
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
