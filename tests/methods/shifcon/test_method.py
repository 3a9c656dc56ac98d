"""ShifCon on real models: hooks, truncated contrastive forward, ZeRO-3 runs, resume, export."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from config.schema import ShifConMethod
from launcher.checkpoints import CheckpointStore
from methods.shifcon.infer import ShiftedLM
from methods.shifcon.math import LanguageStats
from methods.shifcon.method import LANG_KWARG, ShifCon, ShifConHooks, capture_hidden, load_shifcon
from tests.helpers.engine_generation import check_record, engine_generation
from tests.helpers.engine_logits import engine_logits
from tests.helpers.runs import run_data, summary, train, weights

LANGS = ["en", "fr", "sw"]
SHIFCON = {"name": "shifcon", "band": [1, 3], "mcl_batch_size": 4, "vector_samples": 8}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return tiny_model_dir, tokenizer, run_data(tokenizer)


def _model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _method(data, tokenizer, **cfg) -> ShifCon:
    return ShifCon(
        ShifConMethod(**{**SHIFCON, **cfg}),
        languages=data.languages,
        tokenizer=tokenizer,
        train_rows=data.train_rows,
        seed=0,
    )


def _batch(data, tokenizer, n=6):
    from data.formatting import collate

    picked = [e for lang in LANGS for e in data.eval if e.lang == lang][::2][:n]
    return collate(picked, tokenizer.pad_token_id, data.languages)


def _random_hooks(model, positions: str) -> ShifConHooks:
    hooks = ShifConHooks(model, (1, 3), dominant=0, positions=positions)
    stats = LanguageStats.zeros(LANGS, [1, 2, 3], model.config.hidden_size)
    stats.sums.normal_(generator=torch.Generator().manual_seed(0))
    stats.counts.fill_(1.0)
    hooks.set_vectors(stats)
    return hooks


def test_english_is_bitwise_untouched_and_others_shift(tiny):
    path, tokenizer, data = tiny
    plain, hooked = _model(path), _model(path)
    _random_hooks(hooked, "all")
    batch = _batch(data, tokenizer)
    args = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        ref = plain(**args).logits
        out = hooked(**args, **{LANG_KWARG: batch.lang_ids}).logits
        unshifted = hooked(**args).logits
    english = batch.lang_ids == 0
    assert english.any() and (~english).any()
    assert torch.equal(out[english], ref[english])
    assert not torch.allclose(out[~english], ref[~english])
    assert torch.equal(unshifted, ref)  # no language ids: the plain model


def test_prompt_positions_shift_the_prompt_only_in_training_and_cached_decoding(tiny):
    """`shift_positions: prompt`: the training forward shifts the unlabeled positions only, and a
    cached greedy decode (prompt prefilled shifted, generated tokens unshifted) gives the same
    logits as the teacher-forced forward of prompt + answer with the prompt mask."""
    from methods.shifcon.method import SHIFT_MASK_KWARG

    model = _model(tiny[0])
    hooks = _random_hooks(model, "prompt")
    prompt = torch.tensor([[5, 17, 23, 9, 41, 7]])
    sw = torch.tensor([2])
    with torch.no_grad(), hooks.inference_languages(sw):
        out = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
            min_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True,
            pad_token_id=0,
        )  # fmt: skip
    full = out.sequences
    cached = torch.stack(out.logits, dim=1)  # [1, 4, V]: logits at the last prompt + 3 answer
    is_prompt = torch.zeros_like(full, dtype=torch.bool)
    is_prompt[:, : prompt.shape[1]] = True
    args = {"input_ids": full, "attention_mask": torch.ones_like(full), LANG_KWARG: sw}
    with torch.no_grad():
        forced = model(**args, **{SHIFT_MASK_KWARG: is_prompt}).logits
        everywhere = model(**args).logits
        hooks.positions = "all"  # the paper's shift: every position
        all_positions = model(**args).logits
    steps = slice(prompt.shape[1] - 1, full.shape[1] - 1)
    torch.testing.assert_close(cached, forced[:, steps], rtol=1e-4, atol=1e-4)
    # The prompt's own logits are the same under both rules; the answer's differ.
    torch.testing.assert_close(forced[:, : prompt.shape[1]], all_positions[:, : prompt.shape[1]])
    assert not torch.allclose(forced[:, steps][:, 1:], all_positions[:, steps][:, 1:], atol=1e-3)
    torch.testing.assert_close(everywhere, all_positions)  # no mask: every position
    hooks.positions = "none"  # ablation: the contrastive loss alone, the plain forward
    with torch.no_grad():
        unshifted = model(**args).logits
    hooks.remove()
    with torch.no_grad():
        torch.testing.assert_close(unshifted, model(**args).logits, rtol=0, atol=0)


def test_truncated_contrastive_forward(tiny):
    path, tokenizer, data = tiny
    model = _model(path)
    batch = _batch(data, tokenizer)
    calls = {layer: 0 for layer in range(1, 5)}
    for layer in calls:
        model.model.layers[layer - 1].register_forward_pre_hook(
            lambda *_, layer=layer: calls.__setitem__(layer, calls[layer] + 1)
        )
    with torch.no_grad():
        full = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            output_hidden_states=True,
        ).hidden_states
    calls.update(dict.fromkeys(calls, 0))
    method = _method(data, tokenizer, band=[2, 3])
    method.attach(model)
    with torch.no_grad():
        short = capture_hidden(model, model, batch, [2])
    assert calls == {1: 1, 2: 1, 3: 0, 4: 0}  # nothing above b-1 = 2 ran
    torch.testing.assert_close(short[2], full[2], rtol=0, atol=0)

    # The MCL loss sends gradient to layers <= b-1 only.
    method.prepare(model, data.train, batch_size=8)
    model.train()
    loss, per_layer = method.contrastive(model)
    assert per_layer.shape == (1,) and torch.isfinite(loss)
    loss.backward()
    layers = model.model.layers

    def grad_norm(module):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        return sum(float(g.abs().sum()) for g in grads)

    assert grad_norm(layers[0]) > 0 and grad_norm(layers[1]) > 0
    assert grad_norm(layers[2]) == 0 and grad_norm(layers[3]) == 0
    assert grad_norm(model.model.norm) == 0  # the final norm (and the head) do no MCL work


@pytest.mark.slow
def test_bad_band_and_missing_pairs_fail_cleanly(tmp_path, tiny_model_dir):
    proc, run = train(tmp_path, tiny_model_dir, "badband", "method={name: shifcon, band: [2, 4]}")
    assert proc.returncode == 2 and "method.band: (2, 4) does not fit the 4-layer" in proc.stderr
    assert not run.exists()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"lang": "fr", "en": "Hello.", "target": "Bonjour."}) + "\n")
    proc, _ = train(
        tmp_path,
        tiny_model_dir,
        "nopairs",
        f"method={{name: shifcon, band: [1, 3], pairs: {{path: {pairs}}}}}",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "method.pairs: no parallel pairs for language(s) ['sw']" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_two_process_shifcon_zero3(tmp_path, tiny):
    """Both losses fall, and the all-reduced vectors equal one process's over the union."""
    path, tokenizer, data = tiny
    proc, run = train(
        tmp_path,
        path,
        "shifcon_dp2",
        f"method={json.dumps(SHIFCON)}",
        "cluster.workers_per_node=2",
        "training.steps=8",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    history = summary(run)["method_metrics"]
    for key in ("loss_lm", "loss_mcl"):
        assert sum(m[key] for m in history[-2:]) < sum(m[key] for m in history[:2]), key

    meta, exported = load_shifcon(run / "export")
    assert meta["band"] == [1, 3] and meta["languages"] == LANGS
    single = _method(data, tokenizer)
    model = _model(path)
    single.attach(model)
    single.prepare(model, data.train, batch_size=8)
    assert torch.equal(exported.counts, single.stats.counts)
    torch.testing.assert_close(exported.means(), single.stats.means(), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def running_straight(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("running")
    method = json.dumps({**SHIFCON, "vector_mode": "running"})
    proc, run = train(tmp, tiny_model_dir, "running", f"method={method}", "training.steps=6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, method


@pytest.mark.slow
def test_resume_with_running_vectors_is_identical(tmp_path, tiny_model_dir, running_straight):
    straight, method = running_straight
    sets = (f"method={method}", "training.steps=6", "checkpoint.every=3")
    proc, run = train(
        tmp_path, tiny_model_dir, "running", *sets, env={"POLYSHIFT_FAIL_AT": "train_step:5"}
    )
    assert proc.returncode != 0
    assert CheckpointStore(run / "checkpoints", 2).latest() == "step_00000003"
    proc, run = train(tmp_path, tiny_model_dir, "running", *sets)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = summary(straight), summary(run)
    assert a["losses"] == b["losses"] and a["method_metrics"] == b["method_metrics"]
    for key, value in weights(straight).items():
        assert torch.equal(weights(run)[key], value), key
    ours = load_file(run / "export" / "shifcon_vectors.safetensors")
    ref = load_file(straight / "export" / "shifcon_vectors.safetensors")
    assert torch.equal(ours["counts"], ref["counts"]) and torch.equal(
        ours["vectors"], ref["vectors"]
    )
    # Running vectors really moved: more tokens than the precompute pass alone.
    assert float(ours["counts"].sum()) > 0


@pytest.mark.slow
def test_export_shift_off_is_plain_model_and_on_is_training_engine(tmp_path, running_straight):
    run, _ = running_straight
    ref = engine_logits(run, tmp_path)
    lm = ShiftedLM.from_export(run / "export")
    plain = _model(run / "export")
    ids, mask = ref["input_ids"], ref["attention_mask"]
    with torch.no_grad():
        base = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(lm.logits(ids, mask, langs=None), base)
    shifted = lm.logits(ids, mask, langs=ref["langs"])
    content = mask.bool()
    torch.testing.assert_close(shifted[content], ref["logits"][content], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shifted[content], base[content])
    # Generation and detection run on the export.
    answers = lm.generate(["Habari?", "Hello?"], langs=["sw", "en"], max_new_tokens=3)
    assert len(answers) == 2
    assert set(lm.detect(["Bonjour", "Hello"])) <= set(LANGS)


@pytest.mark.slow
def test_engine_cached_generation_equals_uncached_and_the_export(tmp_path, running_straight):
    """The ZeRO-3 engine (one process) decodes with its KV cache, each row shifted by its own
    language at every step: see `tests.helpers.engine_generation.check_record`."""
    run, _ = running_straight
    check_record(engine_generation(run, tmp_path), run / "export", LANGS)


def test_generation_shifts_every_position(tiny):
    """Cached greedy decoding with the shift equals step-by-step full recomputation with the
    shift at every position: decode steps (one token each) are shifted too."""
    path, tokenizer, data = tiny
    model = _model(path)
    method = _method(data, tokenizer)
    method.attach(model)
    method.prepare(model, data.train, batch_size=8)
    method.hooks.remove()
    lm = ShiftedLM(model, tokenizer, {"languages": LANGS, "band": [1, 3]}, method.stats)
    ids, mask = lm._prompt_batch(["Habari yako?"], None, left=True)
    cached = lm.generate_ids(ids, mask, ["sw"], max_new_tokens=6, min_new_tokens=6)
    manual = ids
    for _ in range(6):
        logits = lm.logits(manual, torch.ones_like(manual), ["sw"])
        manual = torch.cat([manual, logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, manual)
    step = torch.ones_like(manual)
    assert not torch.equal(lm.logits(manual, step, ["sw"]), lm.logits(manual, step, None))


@pytest.mark.slow
def test_eval_harness_scores_a_shifcon_export_with_its_shift(running_straight):
    from eval.scorer import HFScorer, load_model
    from eval.suite import shifcon_hooks
    from eval.tasks import evaluate_perplexity

    export = running_straight[0] / "export"
    texts = {"en": ["Hello there, my friend."], "sw": ["Habari ya asubuhi, rafiki yangu."]}
    model, tokenizer = load_model(export)
    plain = evaluate_perplexity(HFScorer(model, tokenizer), texts)
    shifted = evaluate_perplexity(
        HFScorer(model, tokenizer, shift=shifcon_hooks(model, export)), texts
    )
    assert shifted.per_language["en"] == plain.per_language["en"]  # English is never shifted
    assert shifted.per_language["sw"] != plain.per_language["sw"]
