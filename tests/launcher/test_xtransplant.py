"""XTransplant: identity transplant, recorded vectors, prefill-only hooks, batched and Ray search."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from data.formatting import right_pad
from eval.scorer import load_model
from launcher.xtransplant import main
from launcher.xtransplant_config import Instance, XTransplantConfig, build_instances, parse_layers
from launcher.xtransplant_search import init_local_ray, search
from launcher.xtransplant_worker import PairSearchWorker, Unit
from methods.xtransplant import record_outputs, site_module, transplant
from tests.helpers.runs import ROOT

PREMISES = [
    ("The man turned on the faucet.", "effect", 1),
    ("The girl found a bug in her cereal.", "effect", 1),
    ("The woman retired.", "effect", 0),
    ("I wanted to conserve energy.", "cause", 1),
    ("The meat browned.", "cause", 1),
    ("I doubted the salesman.", "effect", 0),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # same math as the 1-CPU Ray actors, and fast on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with layer outputs scaled up, so that one transplant changes answers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(4.0)
            layer.self_attn.o_proj.weight.mul_(4.0)
    out = tmp_path_factory.mktemp("xt") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(model_dir):
    return load_model(model_dir, device="cpu")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """en + zh XCOPA (zh: no space before the choice, so the transplanted position predicts
    the choice's first token) and en + zh MGSM."""
    root = tmp_path_factory.mktemp("xdata")
    (root / "xcopa").mkdir()
    (root / "mgsm").mkdir()
    for lang in ("en", "zh"):
        with (root / "xcopa" / f"{lang}.jsonl").open("w") as fh:
            for idx, (premise, question, label) in enumerate(PREMISES):
                text = premise if lang == "en" else premise.upper()
                row = {"premise": text, "choice1": "ab"[idx % 2] + "q", "question": question,
                       "choice2": "cd"[idx % 2] + "q", "label": label, "idx": idx, "lang": lang}  # fmt: skip
                fh.write(json.dumps(row) + "\n")
        with (root / "mgsm" / f"{lang}.jsonl").open("w") as fh:
            for k in range(4):
                question = f"{k} + 2 = ?" if lang == "en" else f"{k} 加 2 等于多少？"
                fh.write(json.dumps({"question": question, "answer": str(k + 2)}) + "\n")
    return root


def _config(model_dir: Path, data_dir: Path, **kwargs) -> XTransplantConfig:
    base = {"model": str(model_dir), "task": "xcopa", "languages": ["zh"],
            "data_dir": str(data_dir), "dev": 3, "test": 3, "max_new_tokens": 4}  # fmt: skip
    return XTransplantConfig(**{**base, **kwargs})


def _prompt(tokenizer, text: str) -> torch.Tensor:
    from data.formatting import chat_prompt_ids

    return torch.tensor([chat_prompt_ids(tokenizer, text)])


def _generate(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("site", ["mlp", "attn"])
def test_same_prompt_same_layer_is_the_identity(tiny, site):
    model, tokenizer = tiny
    ids = _prompt(tokenizer, "Anna has 5 apples and buys 3 more. How many?")
    last = torch.tensor([ids.shape[1] - 1])
    recorded = record_outputs(model, ids, torch.ones_like(ids), last, site)
    assert recorded.shape == (1, model.config.num_hidden_layers, model.config.hidden_size)
    with torch.no_grad():
        plain_logits = model(ids).logits
    plain_tokens = _generate(model, ids, 5)
    for layer in range(model.config.num_hidden_layers):
        with (
            transplant(model, layer, recorded[:, layer], last, site=site, prompt_len=ids.shape[1]),
            torch.no_grad(),
        ):
            logits = model(ids).logits
        torch.testing.assert_close(logits, plain_logits, atol=1e-5, rtol=1e-5)
        with transplant(model, layer, recorded[:, layer], last, site=site, prompt_len=ids.shape[1]):
            assert torch.equal(_generate(model, ids, 5), plain_tokens)


@pytest.mark.parametrize("site", ["mlp", "attn"])
def test_the_transplanted_vector_is_the_recorded_one(tiny, site):
    model, tokenizer = tiny
    aux = [tokenizer("The man opened the tap")["input_ids"], tokenizer("Rain fell")["input_ids"]]
    aux_ids, aux_mask = right_pad(aux, tokenizer.pad_token_id)
    recorded = record_outputs(
        model, aux_ids, aux_mask, torch.tensor([len(a) - 1 for a in aux]), site
    )
    main_seqs = [tokenizer("MWANAUME ALIFUNGUA")["input_ids"], tokenizer("MVUA")["input_ids"]]
    ids, mask = right_pad(main_seqs, tokenizer.pad_token_id)
    positions = torch.tensor([len(s) - 1 for s in main_seqs])  # right padding: per-row positions
    source, target = 3, 1
    vectors = recorded[:, source]
    captured: list[torch.Tensor] = []

    def capture(_module, _args, output):
        captured.append((output[0] if isinstance(output, tuple) else output).detach().clone())

    module = site_module(model, target, site)

    def run() -> None:
        handle = module.register_forward_hook(capture)  # after the transplant's own hook
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            handle.remove()

    run()  # unmodified
    with transplant(model, target, vectors, positions, site=site, prompt_len=ids.shape[1]):
        run()
    plain, moved = captured
    for row, pos in enumerate(positions.tolist()):
        assert torch.equal(moved[row, pos], vectors[row])
        assert not torch.allclose(plain[row, pos], vectors[row])
        keep = [t for t in range(ids.shape[1]) if t != pos]
        torch.testing.assert_close(moved[row, keep], plain[row, keep])


def test_decode_steps_are_untouched(tiny):
    model, tokenizer = tiny
    ids = _prompt(tokenizer, "What is 4 + 4?")
    aux = _prompt(tokenizer, "Ni kiasi gani 4 + 4?")
    last, n_new = torch.tensor([ids.shape[1] - 1]), 6
    recorded = record_outputs(model, aux, torch.ones_like(aux), torch.tensor([aux.shape[1] - 1]))
    source, target = 3, 2
    vec = recorded[:, source]

    with transplant(model, target, vec, last, prompt_len=ids.shape[1]) as handle:
        tokens = _generate(model, ids, n_new)[0]
    assert handle.applied == 1 and handle.calls == n_new and handle.passed == n_new - 1

    # Reference: transplant the prefill only, then decode with no hook at all.
    with torch.no_grad():
        with transplant(model, target, vec, last, prompt_len=ids.shape[1]):
            out = model(input_ids=ids, use_cache=True)
        plain_first = model(input_ids=ids).logits[0, -1]
        assert not torch.allclose(out.logits[0, -1], plain_first)  # the transplant matters
        manual = [int(out.logits[0, -1].argmax())]
        past = out.past_key_values
        for _ in range(n_new - 1):
            step = model(
                input_ids=torch.tensor([[manual[-1]]]), past_key_values=past, use_cache=True
            )
            past = step.past_key_values
            manual.append(int(step.logits[0, -1].argmax()))
    assert tokens.tolist() == manual


@pytest.mark.parametrize("task", ["xcopa", "mgsm"])
def test_batched_over_sources_equals_the_per_pair_loop(tiny, model_dir, data_dir, task):
    model, tokenizer = tiny
    config = _config(model_dir, data_dir, task=task, dev=2, test=2)
    instances = build_instances(config, "zh")["dev"]
    batched = PairSearchWorker(model, tokenizer, task=task, max_new_tokens=4)
    naive = PairSearchWorker(model, tokenizer, task=task, max_new_tokens=4, batch_sources=False)
    sources = list(range(model.config.num_hidden_layers))
    for target in (0, 2):
        unit = Unit("zh", "dev", target)
        got = batched.run_unit(unit, instances, sources)
        want = naive.run_unit(unit, instances, sources)
        assert got.correct == want.correct and got.sources == sources


def test_shared_prefix_rows_equal_full_prompt_transplants(tiny, model_dir, data_dir):
    """The worker runs the prompt prefix once and B last tokens on its cache; each row must
    equal a plain full-length forward with that row's transplant (independent computation)."""
    model, tokenizer = tiny
    xcopa = build_instances(_config(model_dir, data_dir, dev=1, test=0), "zh")["dev"][0]
    worker = PairSearchWorker(model, tokenizer, task="xcopa")
    sources = list(range(model.config.num_hidden_layers))
    vectors = worker.recorded(("zh", "dev"), [xcopa])[0, sources]
    target = 1
    got = worker.choice_logprobs(xcopa, target, vectors)  # [B, 2]
    ctx = tokenizer(xcopa.main)["input_ids"]
    for b in range(len(sources)):
        for c, choice in enumerate(xcopa.choices):
            full = tokenizer(xcopa.main + choice)["input_ids"]
            ids = torch.tensor([full[:-1]])
            with torch.no_grad(), transplant(model, target, vectors[b : b + 1],
                                             torch.tensor([len(ctx) - 1])):  # fmt: skip
                logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)
            direct = sum(float(logprobs[t - 1, full[t]]) for t in range(len(ctx), len(full)))
            assert float(got[b, c]) == pytest.approx(direct, abs=1e-4)
    assert worker.choice_logprobs(xcopa, None, None)[0].tolist() == pytest.approx(
        [r.logprob for r in worker.scorer.loglikelihood([(xcopa.main, c) for c in xcopa.choices])],
        abs=1e-4,
    )

    mgsm = build_instances(_config(model_dir, data_dir, task="mgsm", dev=1, test=0), "zh")["dev"][0]
    gen = PairSearchWorker(model, tokenizer, task="mgsm", max_new_tokens=5)
    vectors = gen.recorded(("zh", "dev"), [mgsm])[0, sources]
    texts = gen.generate(mgsm, target, vectors)
    prompt = _prompt(tokenizer, mgsm.main)
    for b in range(len(sources)):
        with transplant(model, target, vectors[b : b + 1], torch.tensor([prompt.shape[1] - 1]),
                        prompt_len=prompt.shape[1]):  # fmt: skip
            new = gen.scorer.generate_ids(prompt, torch.ones_like(prompt), 5)
        assert texts[b] == gen.scorer.decode(new[0])


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray")
    init_local_ray(num_cpus=2)
    try:
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.slow
def test_ray_search_equals_sequential(tiny, model_dir, data_dir, local_ray):
    model, tokenizer = tiny
    config = _config(model_dir, data_dir)
    worker = PairSearchWorker(model, tokenizer, task="xcopa")
    sequential = search(config, worker=worker)
    parallel = search(replace(config, ray=True, workers=2))
    assert local_ray.is_initialized()  # the search used, and left, the caller's Ray
    assert parallel["zh"].to_dict() == sequential["zh"].to_dict()
    result = sequential["zh"]
    cells = {v for row in result.dev_grid + (result.test_grid or []) for v in row}
    assert len(cells) > 1  # transplants change answers: the comparison is not vacuous
    assert result.test_upper_bound is not None and result.test_upper_bound >= result.test_best
    i, j = result.best_pair
    assert result.dev_best == max(max(row) for row in result.dev_grid)
    assert result.dev_grid[result.sources.index(i)][result.targets.index(j)] == result.dev_best


def test_search_without_upper_bound_and_layer_subsets(tiny, model_dir, data_dir):
    model, tokenizer = tiny
    worker = PairSearchWorker(model, tokenizer, task="xcopa")
    full = search(_config(model_dir, data_dir), worker=worker)["zh"]
    lean = search(_config(model_dir, data_dir, upper_bound=False), worker=worker)["zh"]
    assert lean.test_grid is None and lean.test_upper_bound is None
    assert (lean.best_pair, lean.test_best, lean.dev_grid) == (
        full.best_pair,
        full.test_best,
        full.dev_grid,
    )
    sub = search(
        _config(model_dir, data_dir, source_layers="1-3", target_layers=[0, 2]), worker=worker
    )
    assert sub["zh"].sources == [1, 2, 3] and sub["zh"].targets == [0, 2]


def test_config_layers_and_cli(model_dir, data_dir, tmp_path, capsys):
    assert parse_layers("all", 4) == [0, 1, 2, 3]
    assert parse_layers("0-29:3", 30) == list(range(0, 30, 3))
    assert parse_layers("5,1,3", 8) == [1, 3, 5]
    with pytest.raises(ValueError, match=r"0\.\.3"):
        parse_layers("2-6", 4)
    with pytest.raises(ValueError, match="unknown key"):
        XTransplantConfig.from_mapping({"modle": "x"})
    with pytest.raises(ValueError, match="pivot"):
        XTransplantConfig(languages=["en"])
    for shipped in sorted((ROOT / "recipes" / "xtransplant").glob("*.yaml")):
        XTransplantConfig.from_mapping(yaml.safe_load(shipped.read_text()), str(shipped))

    config = tmp_path / "xt.yaml"
    config.write_text(yaml.safe_dump({"task": "mgsm", "languages": ["zh"], "dev": 2, "test": 1,
                                      "max_new_tokens": 3, "direction": "x2en"}))  # fmt: skip
    out = tmp_path / "out"
    code = main(["--config", str(config), "--model", str(model_dir), "--data-dir", str(data_dir),
                 "--out", str(out), "--target-layers", "1,3"])  # fmt: skip
    assert code == 0
    assert "| zh | (" in capsys.readouterr().out
    payload = json.loads((out / "xtransplant.json").read_text())
    assert payload["config"]["direction"] == "x2en" and payload["languages"]["zh"]["targets"] == [
        1,
        3,
    ]
    assert (out / "heatmap_mgsm_zh.png").stat().st_size > 0
    # x2en: the main prompt is the pivot's (English) and the aux is the target language's.
    inst = build_instances(XTransplantConfig.from_mapping(
        {**yaml.safe_load(config.read_text()), "data_dir": str(data_dir)}), "zh")["dev"][0]  # fmt: skip
    assert inst == Instance(0, "0 + 2 = ?", "0 加 2 等于多少？", 2.0)
    assert main(["--task", "mgsm", "--languages", "zh", "--dev", "0"]) == 2
