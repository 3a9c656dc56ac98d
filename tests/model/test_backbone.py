"""Backbone resolution: local directories, the hub cache, and clear errors."""

from __future__ import annotations

import shutil

import pytest

from config.schema import ModelSection
from model.backbone import BackboneError, load_tokenizer, resolve_backbone


def test_local_directory(tiny_model_dir):
    resolved = resolve_backbone(ModelSection(backbone=str(tiny_model_dir)))
    assert resolved.path == tiny_model_dir


def test_not_a_model_directory(tmp_path):
    with pytest.raises(BackboneError, match="has no config.json"):
        resolve_backbone(ModelSection(backbone=str(tmp_path)))
    with pytest.raises(BackboneError, match="GGUF file .* does not exist"):
        resolve_backbone(ModelSection(backbone=str(tmp_path / "m.gguf")))
    with pytest.raises(BackboneError, match="model.gguf_file"):
        resolve_backbone(ModelSection(backbone=str(tmp_path), gguf_file="x.gguf"))


def test_hub_id_offline_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        resolve_backbone(ModelSection(backbone="someorg/some-model"))


def test_hub_id_from_local_cache(tmp_path, monkeypatch, tiny_model_dir):
    """A model already in the HF cache layout resolves without any network."""
    cache = tmp_path / "hub"
    repo = cache / "models--someorg--tiny-llama"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    resolved = resolve_backbone(ModelSection(backbone="someorg/tiny-llama"))
    assert resolved.path == repo / "snapshots" / commit
    assert (resolved.path / "config.json").is_file()


def test_unknown_embedded_model():
    with pytest.raises(BackboneError, match="unknown embedded model"):
        resolve_backbone(ModelSection(backbone="embedded:nope"))


def test_chat_template_override(tiny_model_dir):
    section = ModelSection(backbone=str(tiny_model_dir), chat_template="{{ 'X' }}")
    tokenizer = load_tokenizer(resolve_backbone(section), section)
    assert tokenizer.chat_template == "{{ 'X' }}"
    assert section.trust_remote_code is False
