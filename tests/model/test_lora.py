"""LoRA through peft on a tiny Llama: the recipe section, the injection, the merge, the adapter
format, and ShifCon's hooks on an adapted model (no engine, no process)."""

from __future__ import annotations

import pytest
import torch

from config.errors import UserError
from config.recipe import RecipeError, load_recipe
from config.schema import LoraSection, Recipe
from methods.registry import recipe_errors
from model.layers import decoder_layers
from model.lora import (
    ADAPTER,
    apply_lora,
    lora_modules,
    merged_state_dict,
    save_adapter,
)


def _load(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _nonzero_adapters(model, seed: int = 1) -> None:
    """peft starts B at zero (the adapted model is the base); give the adapters a value."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            b = module.lora_B[ADAPTER].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def _ids(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


# -- recipe -------------------------------------------------------------------------------


def test_section_defaults_and_field_errors(tmp_path):
    assert Recipe(name="x").lora.enabled is False
    assert LoraSection(layers=[3, 1]).layers == [1, 3]
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nlora: {enabled: true, layers: [2, 2], rank: 0, dropout: 1.0}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    text = str(err.value)
    assert "lora.layers: layer numbers repeat: [2, 2]" in text
    assert "lora.rank:" in text and "lora.dropout:" in text
    path.write_text("name: x\nlora: {enabled: true, target: [q_proj]}\n")
    with pytest.raises(RecipeError, match=r"lora.target: unknown key"):
        load_recipe(path)


def test_registry_refuses_megatron_lens_and_4bit():
    def errors(**fields):
        return recipe_errors(Recipe.model_validate({"name": "x", **fields}))

    lora = {"enabled": True}
    assert errors(lora=lora) == []
    assert errors(lora=lora, method={"name": "shifcon", "band": [1, 2]}) == []
    assert errors(lora={"enabled": False}, parallel={"engine": "megatron"}) == []
    (megatron,) = errors(lora=lora, parallel={"engine": "megatron"})
    assert megatron.startswith("lora.enabled:") and "deepspeed engine only" in megatron
    (lens,) = errors(lora=lora, method={"name": "lens"})
    assert lens.startswith("lora.enabled: method lens")
    (nf4,) = errors(lora={**lora, "quantize": "nf4"}, cluster={"device": "cpu"})
    assert nf4.startswith("lora.quantize: nf4") and "bitsandbytes" in nf4


# -- injection ----------------------------------------------------------------------------


def test_only_adapters_train_on_the_given_1_based_layers(tiny_model_dir):
    model = _load(tiny_model_dir)
    total_before = sum(p.numel() for p in model.parameters())
    section = LoraSection(
        enabled=True, rank=4, target_modules=["q_proj", "down_proj"], layers=[2, 4]
    )
    trainable = apply_lora(model, section)
    adapted = sorted(lora_modules(model))
    assert adapted == [
        f"model.layers.{i}.{m}" for i in (1, 3) for m in ("mlp.down_proj", "self_attn.q_proj")
    ]
    h, inter = model.config.hidden_size, model.config.intermediate_size
    assert trainable == 2 * 4 * ((h + h) + (inter + h))  # r * (in + out) per adapted linear
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert sum(p.numel() for p in model.parameters()) == total_before + trainable
    # The HF model itself is adapted in place: the layer stack methods hook is the same one.
    assert type(model).__name__ == "LlamaForCausalLM" and len(decoder_layers(model)) == 4


def test_bad_layers_and_targets_are_user_errors(tiny_model_dir):
    with pytest.raises(UserError, match=r"lora.layers: \[5\] beyond the backbone's 4"):
        apply_lora(_load(tiny_model_dir), LoraSection(enabled=True, layers=[1, 5]))
    with pytest.raises(UserError, match="lora.target_modules:"):
        apply_lora(_load(tiny_model_dir), LoraSection(enabled=True, target_modules=["qkv"]))


def test_a_training_step_moves_only_the_adapters(tiny_model_dir):
    model = _load(tiny_model_dir).train()
    apply_lora(model, LoraSection(enabled=True, rank=4, dropout=0.1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids(model.config.vocab_size)
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_" in k for k in changed)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


# -- export -------------------------------------------------------------------------------


def test_merged_state_dict_loads_in_plain_transformers_with_the_same_logits(
    tiny_model_dir, tmp_path
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = _load(tiny_model_dir)
    apply_lora(model, LoraSection(enabled=True, rank=4, alpha=16, layers=[1, 3]))
    _nonzero_adapters(model)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        base = _load(tiny_model_dir)(input_ids=ids).logits
    assert (ref - base).abs().max() > 1e-3  # the adapters change the function

    state = model.state_dict()
    merged = merged_state_dict(model, state)
    assert not any("lora_" in k or "base_layer" in k for k in merged)
    model.save_pretrained(tmp_path / "merged", state_dict=merged, safe_serialization=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(input_ids=ids).logits, ref, rtol=1e-5, atol=1e-5)

    adapter = save_adapter(model, state, tmp_path / "adapter", str(tiny_model_dir))
    assert {p.name for p in adapter.iterdir()} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }
    peft_model = PeftModel.from_pretrained(_load(tiny_model_dir), adapter).eval()
    assert peft_model.peft_config["default"].layers_to_transform == [0, 2]
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, ref, rtol=0, atol=0)


# -- ShifCon on an adapted model ------------------------------------------------------------


def test_shifcon_hooks_fire_through_the_adapted_layers(tiny_model_dir):
    from methods.shifcon.math import LanguageStats
    from methods.shifcon.method import LANG_KWARG, ShifConHooks

    def shifted_logits(model, lang_ids):
        hooks = ShifConHooks(model, (1, 3), dominant=0)
        layers, hidden = [1, 3], model.config.hidden_size
        sums = torch.randn(2, 2, hidden, generator=torch.Generator().manual_seed(3)).double()
        hooks.set_vectors(LanguageStats(["en", "sw"], layers, sums, torch.ones(2, 2)))
        try:
            with torch.no_grad():
                return model(input_ids=ids, **{LANG_KWARG: lang_ids}).logits
        finally:
            hooks.remove()

    base = _load(tiny_model_dir)
    ids = _ids(base.config.vocab_size)
    adapted = _load(tiny_model_dir)
    apply_lora(adapted, LoraSection(enabled=True, rank=4))  # B = 0: the same function
    sw, en = torch.tensor([1, 1]), torch.tensor([0, 0])
    torch.testing.assert_close(shifted_logits(adapted, sw), shifted_logits(base, sw))
    assert (shifted_logits(adapted, sw) - shifted_logits(adapted, en)).abs().max() > 1e-3
