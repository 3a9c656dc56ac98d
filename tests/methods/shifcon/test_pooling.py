"""Pooling and language detection on a tiny model that has an attention sink, as real LLMs do.

The tiny Llama's chat-start token gets an embedding ~100x the others' norm, so the first position
(and every template marker) carries a massive activation through the residual stream, like the
first token of SmolLM2 (norm ~23,000 vs ~140). Three separable "languages" share digits the way
translations share numbers. Means over every token then point the same way for all sentences:
the InfoNCE sits at chance and detection by centroid fails; pooling over the sentence's own
tokens, centred on the language vectors, fixes both.
"""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.schema import DataSection, DataSource, ShifConMethod
from data.formatting import chat_prompt_ids, content_span
from data.pipeline import build_run_data
from methods.shifcon.detect import LinearDetector
from methods.shifcon.infer import ShiftedLM, detection_accuracies, detection_accuracy
from methods.shifcon.method import ShifCon
from tests.helpers.tiny import make_tiny_llama

LANGS = ["en", "xx", "yy"]
WORDS = {
    "en": ["the", "cat", "has", "apples", "and", "sells", "some", "pears", "more", "each"],
    "xx": ["QO", "ZAR", "KEM", "TUVAL", "ORO", "XEND", "BIM", "PLOR", "GAST", "WEY"],
    "yy": ["λα", "φιρ", "δομ", "ψυλε", "κα", "θρεν", "μοι", "σπαρ", "ξυν", "ηλω"],
}


def sentence(lang: str, words: list[int], numbers: list[int]) -> str:
    parts = [WORDS[lang][w] for w in words]
    for k, n in enumerate(numbers):
        parts.insert(2 * k + 1, str(n))
    return " ".join(parts)


def rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.randrange(10) for _ in range(5)]
        numbers = [rng.randrange(10, 999) for _ in range(2)]
        for lang in LANGS:
            text = sentence(lang, words, numbers)
            out.append({"id": f"{seed}-{i}", "lang": lang, "instruction": text, "response": "ok"})
    return out


@pytest.fixture(scope="module")
def sink_model(tmp_path_factory):
    """A tiny Llama whose `<|im_start|>` embedding is ~100x larger: a massive first position."""
    path = make_tiny_llama(tmp_path_factory.mktemp("sink") / "model", layers=4, hidden=64)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    emb = model.get_input_embeddings().weight
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    with torch.no_grad():
        emb[start] = emb[start] / emb[start].norm() * 100 * emb.norm(dim=1).median()
    model.save_pretrained(path, safe_serialization=True)
    train_file = path.parent / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in rows(48, 0)) + "\n")
    section = DataSection(
        train=[DataSource(path=str(train_file))], languages=LANGS, eval_fraction=0.01
    )
    data = build_run_data(section, tokenizer)
    return path, tokenizer, data


def _method(data, tokenizer, **cfg) -> ShifCon:
    base = {"name": "shifcon", "band": [1, 3], "mcl_batch_size": 8, "vector_samples": 40}
    return ShifCon(
        ShifConMethod(**{**base, **cfg}),
        languages=data.languages,
        tokenizer=tokenizer,
        train_rows=data.train_rows,
        seed=0,
    )


def _prepared(sink_model, **cfg):
    path, tokenizer, data = sink_model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    method = _method(data, tokenizer, **cfg)
    method.attach(model)
    method.prepare(model, data.train, batch_size=8)
    return model, method


def test_content_span_is_the_instruction_only(sink_model):
    _, tokenizer, _ = sink_model
    text = "the cat 417 has"
    ids = chat_prompt_ids(tokenizer, text)
    start, end = content_span(tokenizer, text)
    assert tokenizer.decode(ids[start:end]) == text
    assert start >= 1 and tokenizer.decode(ids[:start]).endswith("user\n")


def test_first_position_is_massive(sink_model):
    path, tokenizer, _ = sink_model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([chat_prompt_ids(tokenizer, "the cat 417 has")])
    with torch.no_grad():
        h = model(input_ids=ids, output_hidden_states=True).hidden_states[2][0]
    norms = h.norm(dim=-1)
    assert norms[0] > 30 * norms[1:].median()


def test_mcl_at_init_is_below_chance_with_content_pooling(sink_model):
    """The InfoNCE of parallel pairs at initialisation: chance (ln 8) means no learning signal.
    Every-token means (the original pooling) sit at chance; content pooling does not."""
    chance = math.log(8)
    values = {}
    for pooling in ("all", "content"):
        model, method = _prepared(sink_model, pooling=pooling, tau=0.1)
        with torch.no_grad():
            values[pooling] = sum(float(method.contrastive(model)[0]) for _ in range(6)) / 6
    assert values["all"] > 0.97 * chance, values
    assert values["content"] < 0.8 * chance, values


def test_detection_on_separable_languages(sink_model, tmp_path):
    """Held-out prompts of three separable languages: the linear detector and the centroids of
    content-pooled H_f are (near) perfect; every-token centroids are not; the detector survives
    the export (safetensors) unchanged."""
    _, tokenizer, _ = sink_model
    held = rows(20, 7)
    accs = {}
    for pooling in ("all", "content"):
        model, method = _prepared(sink_model, pooling=pooling)
        method.hooks.remove()
        lm = ShiftedLM(
            model, tokenizer, {"languages": LANGS, "band": [1, 3]}, method.stats, method.detector
        )
        if pooling == "all":
            # the original detector: means over every position, against every-token vectors
            lm.prompt_features = lambda prompts, *_, _lm=lm: _all_token_features(_lm, prompts)
        accs[pooling] = {
            det: detection_accuracy(lm, held, detector=det) for det in ("centroid", "linear")
        }
        # detect-eval's path (features once for every detector) gives the same numbers
        assert detection_accuracies(lm, held, ["centroid", "linear"]) == accs[pooling]
        if pooling == "content":
            method.export(tmp_path)
            loaded = LinearDetector.load(tmp_path)
            features = lm.prompt_features([r["instruction"] for r in held])
            assert torch.equal(loaded.predict(features), method.detector.predict(features))
    assert min(accs["content"]["centroid"].values()) >= 0.95, accs
    assert min(accs["content"]["linear"].values()) >= 0.95, accs
    assert min(accs["all"]["centroid"].values()) < 0.8, accs


def _all_token_features(lm: ShiftedLM, prompts):
    from data.formatting import Example, collate
    from methods.shifcon.math import pooled_mean
    from methods.shifcon.method import capture_hidden

    examples = [Example(x, x, "", "") for x in (chat_prompt_ids(lm.tokenizer, p) for p in prompts)]
    batch = collate(examples, lm.tokenizer.pad_token_id, [""])
    f = lm.band[0]
    h = capture_hidden(lm.model, lm.model, batch, [f])[f]
    return pooled_mean(h, batch.attention_mask)


@pytest.mark.slow
def test_detect_eval_cli_rejects_bad_input(tmp_path):
    cmd = [sys.executable, "-m", "launcher.shifcon_infer", "detect-eval", "--model", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # An empty folder is refused before any model loads (launcher.preflight's file checks).
    assert proc.returncode == 2 and "has no config.json" in proc.stderr, proc.stderr
