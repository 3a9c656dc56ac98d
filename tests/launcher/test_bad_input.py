"""Bad input to every CLI: exit 2, a message naming the field or file, no traceback, and for
the run CLI no run directory (issue 13, items 3, 4 and 8).

Table-driven: each case is what a careless or hostile user would give; the CLIs' main()
functions run in-process (fast), a few fresh-interpreter runs check the end-to-end promise.
"""

from __future__ import annotations

import json
import shutil
import string
import struct
import sys

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from config.recipe import RecipeError, validate_recipe
from launcher.run import main as run_main
from tests.helpers.runs import ROOT, clean_env, run_cli, tiny_recipe, write_recipe


def _expect_rejected(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


# -- recipes: the schema ----------------------------------------------------------------------

SET_CASES = [
    ("training.betas=[0.9,1.5]", "training.betas.1"),
    ("training.betas=[-0.1,0.9]", "training.betas.0"),
    ("training.seed=1180591620717411303424", "training.seed"),  # 2**70
    ("training.seed=-1", "training.seed"),
    ("training.steps=true", "training.steps"),
    ("training.steps=2.0", "training.steps"),
    ("training.global_batch_size=false", "training.global_batch_size"),
    ("training.lr=.inf", "training.lr"),
    ("training.lr=.nan", "training.lr"),
    ("training.weight_decay=.inf", "training.weight_decay"),
    ("training.grad_clip=true", "training.grad_clip"),
    ("training.steps=10000000000", "training.steps"),
    ("training.micro_batch_size=1000000", "training.micro_batch_size"),
    ("cluster.workers_per_node=1000000", "cluster.workers_per_node"),
    ("cluster.nodes=10000000", "cluster.nodes"),
    ("data.max_length=100000000", "data.max_length"),
    ("data.eval_samples_per_language=true", "data.eval_samples_per_language"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last"),
    ("parallel.zero_stage=true", "parallel.zero_stage"),
    ("name=" + "a" * 300, "name: String should have at most 128 characters"),
    ("output_dir=", "output_dir"),
    ("model.chat_template='{% for m in %}'", "model.chat_template: not a valid Jinja template"),
    ("eval.limit=true", "eval.limit"),
]


@pytest.mark.parametrize(("override", "field"), SET_CASES, ids=[c[0][:40] for c in SET_CASES])
def test_bad_values_are_named_before_the_run_dir(tmp_path, tiny_model_dir, capsys, override, field):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    code = run_main([str(path), "--set", override])
    _expect_rejected(capsys, code, field)
    assert not (tmp_path / "runs").exists()


METHOD_CASES = [
    ({"name": "shifcon", "band": [1, 3], "vector_samples": 10**9}, "method.vector_samples"),
    ({"name": "shifcon", "band": [1, 3], "probe_samples": True}, "method.probe_samples"),
    ({"name": "shifcon", "band": [True, 3]}, "method.band"),
    ({"name": "shifcon", "band": [1, 3], "tau": float("inf")}, "method.tau"),
    ({"name": "shifcon", "band": [1, 3], "mcl_batch_size": 10**6}, "method.mcl_batch_size"),
    ({"name": "lens", "top_k": 10**5}, "method.top_k"),
]


@pytest.mark.parametrize(("method", "field"), METHOD_CASES, ids=[c[1] for c in METHOD_CASES])
def test_bad_method_values(tmp_path, tiny_model_dir, capsys, method, field):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path, method=method))
    _expect_rejected(capsys, run_main([str(path)]), field)
    assert not (tmp_path / "runs").exists()


COUNT_FIELDS = [
    ("training", "steps"),
    ("training", "global_batch_size"),
    ("training", "micro_batch_size"),
    ("training", "warmup_steps"),
    ("training", "eval_every"),
    ("training", "eval_batch_size"),
    ("training", "log_every"),
    ("training", "seed"),
    ("cluster", "nodes"),
    ("cluster", "workers_per_node"),
    ("cluster", "max_failures"),
    ("checkpoint", "every"),
    ("checkpoint", "keep_last"),
    ("data", "max_length"),
    ("data", "eval_samples_per_language"),
    ("eval", "batch_size"),
    ("eval", "max_new_tokens"),
    ("parallel", "tensor_parallel"),
    ("parallel", "pipeline_parallel"),
]


@settings(max_examples=200, deadline=None)
@given(
    where=st.sampled_from(COUNT_FIELDS),
    value=st.one_of(
        st.booleans(),
        st.integers(min_value=2**31, max_value=2**80),
        st.integers(max_value=-1),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(alphabet=string.ascii_letters, max_size=4),
    ),
)
def test_count_fields_refuse_bools_floats_and_absurd_sizes(where, value):
    """No count-like field takes a bool, a float, a negative or a > 2**31 value: a RecipeError
    naming the field (the cross-field checks may name another field of the same section)."""
    section, key = where
    with pytest.raises(RecipeError) as err:
        validate_recipe({"name": "x", section: {key: value}})
    assert f"{section}." in str(err.value)


# -- recipes: files and the raw DeepSpeed block -----------------------------------------------

TEXT_CASES = [
    (
        "name: a\ntraining:\n  steps: 3\ntraining:\n  steps: 4\n",
        "r.yaml:4: duplicate key 'training'",
    ),
    ("name: a\ntraining: {steps: 3, lr: 0.1, steps: 4}\n", "r.yaml:2: duplicate key 'steps'"),
    ("name: a\ntraining:\n  steps: [1\n", "r.yaml:4"),
]


@pytest.mark.parametrize(("text", "needle"), TEXT_CASES, ids=["dup-top", "dup-nested", "syntax"])
def test_recipe_text_problems_name_the_line(tmp_path, capsys, text, needle):
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    _expect_rejected(capsys, run_main([str(path)]), needle)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("name: a\n".encode("utf-16"), "is UTF-16 text; save it as UTF-8"),
        ("name: a\n".encode("utf-16-le"), "it looks like UTF-16"),
        (b"name: a\n# caf\xe9\n", "r.yaml:2: the recipe is not UTF-8 text (byte 0xe9)"),
    ],
    ids=["utf16-bom", "utf16-le", "latin1"],
)
def test_recipe_in_the_wrong_encoding(tmp_path, capsys, data, needle):
    path = tmp_path / "r.yaml"
    path.write_bytes(data)
    _expect_rejected(capsys, run_main([str(path)]), needle)


DEEPSPEED_CASES = [
    ({"zero_optimizaton": {"stage": 2}}, "parallel.deepspeed.zero_optimizaton: not a DeepSpeed"),
    ({"zero_optimization": {"stagee": 2}}, "DeepSpeed rejects the merged config"),
    ({"train_batch_size": 16}, "parallel.deepspeed.train_batch_size: 16 contradicts"),
    ({"gradient_accumulation_steps": 7}, "parallel.deepspeed.gradient_accumulation_steps"),
    ({"optimizer": {"params": {"eps": 0}}}, "parallel.deepspeed.optimizer.params.eps"),
    ({"optimizer": {"params": {"betas": [0.9, 1.0]}}}, "optimizer.params.betas"),
    ({"optimizer": {"params": {"lr": float("inf")}}}, "optimizer.params.lr: must be finite"),
    ({"optimizer": {"params": {"weight_decay": -1}}}, "optimizer.params.weight_decay"),
    ({"nebula": {"enabled": True}}, "DeepSpeed rejects the merged config: Nebula"),
]


@pytest.mark.parametrize(
    ("block", "needle"), DEEPSPEED_CASES, ids=[c[1][:40] for c in DEEPSPEED_CASES]
)
def test_raw_deepspeed_block_is_checked(tmp_path, tiny_model_dir, capsys, block, needle):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, parallel={"deepspeed": block})
    _expect_rejected(capsys, run_main([str(write_recipe(tmp_path / "r.yaml", recipe))]), needle)
    assert not (tmp_path / "runs").exists()


def test_a_valid_raw_deepspeed_block_passes(tmp_path, tiny_model_dir, capsys):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, parallel={"deepspeed": {
        "zero_optimization": {"reduce_bucket_size": 12345}, "train_batch_size": 4,
        "optimizer": {"params": {"eps": 1e-6}}}})  # fmt: skip
    assert run_main([str(write_recipe(tmp_path / "r.yaml", recipe)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"reduce_bucket_size": 12345' in out and '"eps": 1e-06' in out


def test_output_dir_that_is_a_file_or_not_writable(tmp_path, tiny_model_dir, capsys):
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    code = run_main([str(path), "--set", f"output_dir={blocker / 'runs'}"])
    _expect_rejected(capsys, code, f"output_dir: {blocker} is a file")
    code = run_main([str(path), "--set", "output_dir=/proc/polyshift-runs"])
    _expect_rejected(capsys, code, "output_dir: cannot create /proc/polyshift-runs", "writable")
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gpu_recipe_without_cuda_fails_but_its_dry_run_plans(tmp_path, tiny_model_dir, capsys):
    recipe = tiny_recipe(tiny_model_dir, tmp_path, cluster={"device": "gpu"})
    path = str(write_recipe(tmp_path / "r.yaml", recipe))
    _expect_rejected(capsys, run_main([path]), "cluster.device: gpu", "CUDA is not available")
    assert not (tmp_path / "runs").exists()
    assert run_main([path, "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "note: cluster.device: gpu but CUDA is not available" in captured.err
    assert "# resolved DeepSpeed config (device: cuda)" in captured.out
    assert '"enabled": true' in captured.out  # bf16, as the GPU workers would run


def test_too_many_local_cpu_workers(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    recipe = tiny_recipe(tiny_model_dir, tmp_path, cluster={"device": "cpu", "workers_per_node": 32},
                         training={"global_batch_size": 64, "micro_batch_size": 2})  # fmt: skip
    code = run_main([str(write_recipe(tmp_path / "r.yaml", recipe))])
    _expect_rejected(capsys, code, "cluster.workers_per_node: 32 CPU workers", "2 core")
    assert not (tmp_path / "runs").exists()


# -- broken backbones (shared by the run CLI and the model CLIs) -------------------------------


def _random_header(d):
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 40) + b"\x93" * 40 + b"\x00" * 64)


def _huge_header(d):
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}")


def _truncated(d):
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])


def _string_int(d):
    config = json.loads((d / "config.json").read_text())
    config["num_hidden_layers"] = "four"
    (d / "config.json").write_text(json.dumps(config))


def _unknown_type(d):
    config = json.loads((d / "config.json").read_text())
    config["model_type"] = "no-such-architecture"
    (d / "config.json").write_text(json.dumps(config))


def _missing_shard(d):
    (d / "model.safetensors").rename(d / "model-00001-of-00001.safetensors")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN_MODELS = {
    "corrupt-config": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
                       "config.json:1:"),
    "config-not-object": (lambda d: (d / "config.json").write_text("[1, 2]"),
                          "config.json is not a JSON object"),
    "config-not-utf8": (lambda d: (d / "config.json").write_bytes(b'{"a": "\xff"}'),
                        "config.json is not UTF-8"),
    "no-config": (lambda d: (d / "config.json").unlink(), "has no config.json"),
    "string-int": (_string_int, "config.json: num_hidden_layers must be an integer, got 'four'"),
    "unknown-model-type": (_unknown_type, "config.json is not a valid model config"),
    "random-safetensors": (_random_header, "model.safetensors has a corrupt safetensors header"),
    "huge-header": (_huge_header, "model.safetensors is not a safetensors file"),
    "truncated-weights": (_truncated, "model.safetensors: tensor"),
    "empty-weights": (lambda d: (d / "model.safetensors").write_bytes(b""), "too short"),
    "no-weights": (lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "missing-shard": (_missing_shard, "model-00002-of-00002.safetensors (named in"),
    "no-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer"),
    "corrupt-tokenizer": (lambda d: (d / "tokenizer.json").write_text("{"), "tokenizer.json:1:"),
}  # fmt: skip


@pytest.fixture
def broken_model(tmp_path, tiny_model_dir, request):
    breaks, needle = BROKEN_MODELS[request.param]
    target = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, target)
    breaks(target)
    return target, needle


def _text_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not GGUF\n")
    return path


@pytest.mark.parametrize("broken_model", list(BROKEN_MODELS), indirect=True)
def test_broken_backbone_is_named_before_the_run_dir(tmp_path, broken_model, capsys):
    model, needle = broken_model
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(model, tmp_path))
    _expect_rejected(capsys, run_main([str(path)]), "model.backbone", needle)
    assert not (tmp_path / "runs").exists()


def test_text_file_named_gguf(tmp_path, capsys):
    gguf = _text_gguf(tmp_path)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(gguf, tmp_path))
    _expect_rejected(capsys, run_main([str(path)]), f"model.backbone: {gguf} is not a GGUF file")
    assert not (tmp_path / "runs").exists()


def _cli_mains():
    from data.crossin import main as crossin_main
    from launcher.evaluate import main as evaluate_main
    from launcher.probe import main as probe_main
    from launcher.shifcon_infer import main as infer_main
    from launcher.xtransplant import main as xtransplant_main
    from parallel.plan import main as plan_main

    return {
        "evaluate": lambda m, t: evaluate_main(["--model", str(m), "--languages", "en,sw",
                                                "--data-dir", str(t)]),
        "evaluate-lm-eval": lambda m, t: evaluate_main(["--model", str(m), "--harness",
                                                        "lm-eval", "--tasks", "xcopa_sw"]),
        "shifcon_infer": lambda m, t: infer_main(["generate", str(m), "--prompt", "hi"]),
        "detect-eval": lambda m, t: infer_main(["detect-eval", "--model", str(m)]),
        "probe": lambda m, t: probe_main(["--model", str(m), "--languages", "en,sw",
                                          "--out", str(t / "probe")]),
        "xtransplant": lambda m, t: xtransplant_main(["--model", str(m), "--out", str(t / "x")]),
        "crossin": lambda m, t: crossin_main(["--source", str(m / "rows.jsonl"), "--out",
                                              str(t / "c"), "--size", "4"]),
        "plan": lambda m, t: plan_main([str(m / "recipe.yaml")]),
    }  # fmt: skip


MODEL_CLIS = [
    "evaluate",
    "evaluate-lm-eval",
    "shifcon_infer",
    "detect-eval",
    "probe",
    "xtransplant",
]
MODEL_BREAKS = ["corrupt-config", "string-int", "random-safetensors", "no-weights", "no-tokenizer"]


@pytest.mark.parametrize("cli", MODEL_CLIS)
@pytest.mark.parametrize("broken_model", MODEL_BREAKS, indirect=True)
def test_model_clis_name_the_broken_file(tmp_path, broken_model, capsys, cli):
    model, needle = broken_model
    code = _cli_mains()[cli](model, tmp_path)
    _expect_rejected(capsys, code, needle)
    assert not (tmp_path / "probe").exists() and not (tmp_path / "x").exists()


@pytest.mark.parametrize("cli", MODEL_CLIS)
def test_model_clis_on_a_text_gguf(tmp_path, capsys, cli):
    gguf = _text_gguf(tmp_path)
    _expect_rejected(capsys, _cli_mains()[cli](gguf, tmp_path), "is not a GGUF file")


@pytest.mark.parametrize("command", ["shifcon_infer", "detect-eval"])
def test_shifcon_infer_on_a_plain_export(tmp_path, tiny_model_dir, capsys, command):
    code = _cli_mains()[command](tiny_model_dir, tmp_path)
    _expect_rejected(capsys, code, f"{tiny_model_dir} is not a ShifCon export (no shifcon.json")


# -- data, pairs and benchmark files ------------------------------------------------------------

DATA_CASES = [
    ("missing", None, "data.train.0.path"),
    ("bad-json", '{"lang": "en", "instruction": "a", "response": "b"}\n{"lang": \n', "rows.jsonl:2: invalid JSON"),
    ("not-object", "[1, 2]\n", "rows.jsonl:1: a row is a JSON object"),
    ("latin1", b'{"lang": "en", "instruction": "caf\xe9"}\n', "rows.jsonl:1: not UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize(("kind", "content", "needle"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_files_before_the_run_dir(tmp_path, tiny_model_dir, capsys, kind, content, needle):
    rows = tmp_path / "rows.jsonl"
    if isinstance(content, bytes):
        rows.write_bytes(content)
    elif content is not None:
        rows.write_text(content)
    recipe = tiny_recipe(tiny_model_dir, tmp_path)
    recipe["data"]["train"] = [{"path": str(rows)}]
    _expect_rejected(capsys, run_main([str(write_recipe(tmp_path / "r.yaml", recipe))]), needle)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["data.train.0.path=builtin:polyglot?items=many"], "data.train.0.path: builtin:polyglot"),
        (["data.train.0.path=builtin:polyglot?colour=red"], "unknown parameter(s) colour"),
        (["data.train.0.path=builtin:nope"], "unknown builtin source 'nope'"),
        (["data.languages=[en,xx]"], "data.languages: no training rows for ['xx']"),
    ],
    ids=["items", "param", "name", "language"],
)
def test_builtin_source_problems_before_the_run_dir(tmp_path, tiny_model_dir, capsys, sets, needle):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    code = run_main([str(path), *[a for s in sets for a in ("--set", s)]])
    _expect_rejected(capsys, code, needle)
    assert not (tmp_path / "runs").exists()


def test_bad_pairs_and_eval_files_before_the_run_dir(tmp_path, tiny_model_dir, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{not json}\n")
    recipe = tiny_recipe(tiny_model_dir, tmp_path,
                         method={"name": "shifcon", "band": [1, 3], "pairs": {"path": str(pairs)}})  # fmt: skip
    code = run_main([str(write_recipe(tmp_path / "r.yaml", recipe))])
    _expect_rejected(capsys, code, "method.pairs.path", "pairs.jsonl:1: invalid JSON")
    recipe = tiny_recipe(tiny_model_dir, tmp_path,
                         eval={"tasks": ["xcopa"], "data_dir": str(tmp_path / "nope")})  # fmt: skip
    code = run_main([str(write_recipe(tmp_path / "r.yaml", recipe))])
    _expect_rejected(capsys, code, "eval:", str(tmp_path / "nope"))
    assert not (tmp_path / "runs").exists()


# -- the other CLIs' own inputs -----------------------------------------------------------------


def test_crossin_and_plan_bad_files(tmp_path, capsys):
    mains = _cli_mains()
    (tmp_path / "rows.jsonl").write_bytes(b'{"id": 1, "lang": "en", "instruction": "\xff"}\n')
    _expect_rejected(capsys, mains["crossin"](tmp_path, tmp_path), "rows.jsonl")
    assert not (tmp_path / "c").exists()
    (tmp_path / "recipe.yaml").write_text("name: a\nname: b\n")
    _expect_rejected(capsys, mains["plan"](tmp_path, tmp_path), "duplicate key 'name'")
    (tmp_path / "recipe.yaml").write_text("name: a\ntraining: {betas: [0.9, 1.5]}\n")
    _expect_rejected(capsys, mains["plan"](tmp_path, tmp_path), "training.betas.1")


def test_xtransplant_config_file_problems(tmp_path, tiny_model_dir, capsys):
    from launcher.xtransplant import main as xtransplant_main

    config = tmp_path / "x.yaml"
    config.write_text(f"model: {tiny_model_dir}\ntask: mgsm\ntask: xcopa\n")
    _expect_rejected(capsys, xtransplant_main(["--config", str(config)]), "x.yaml:3: duplicate key")
    config.write_bytes("task: mgsm\n".encode("utf-16"))
    _expect_rejected(capsys, xtransplant_main(["--config", str(config)]), "UTF-16")


@pytest.mark.parametrize(
    "argv",
    [
        ["data.crossin", "--source", "x", "--out", "o", "--size", "true"],
        ["data.crossin", "--source", "x", "--out", "o", "--size", "0"],
        ["launcher.probe", "--model", "m", "--languages", "en,sw", "--out", "o", "--samples", "-3"],
        ["launcher.evaluate", "--model", "m", "--languages", "sw", "--limit", "many"],
        ["launcher.xtransplant", "--model", "m", "--workers", "1e9"],
        ["launcher.shifcon_infer", "generate", "m", "--prompt", "p", "--max-new-tokens", "0"],
    ],
    ids=lambda a: " ".join(a[:1] + a[-2:]),
)
def test_bad_flags_are_usage_errors(capsys, argv):
    import importlib

    main = importlib.import_module(argv[0]).main
    with pytest.raises(SystemExit) as exit_info:
        main(argv[1:])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error: argument" in err


def test_every_option_of_crossin_and_xtransplant_has_help(capsys):
    from data.crossin import main as crossin_main
    from launcher.xtransplant import _parser

    actions = [a for a in _parser()._actions if a.option_strings and a.dest != "help"]
    assert len(actions) == 20 and all(a.help for a in actions), [a.dest for a in actions]
    with pytest.raises(SystemExit):  # the crossin parser is built inside main: read --help
        crossin_main(["--help"])
    text = capsys.readouterr().out
    blocks = text.split("options:", 1)[1].split("\n  --")[1:]
    assert len(blocks) == 10
    for block in blocks:  # "--flag FLAG   help..." possibly wrapped onto the next lines
        assert len(block.split()) > 2, block


# -- end to end: a fresh interpreter, as a user runs it -----------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["training.betas=[0.9,1.5]"], "training.betas.1"),
        (["training.steps=true"], "training.steps"),
        (["cluster.device=gpu"] if not torch.cuda.is_available() else ["training.seed=-1"],
         "cluster.device" if not torch.cuda.is_available() else "training.seed"),
        (["parallel.deepspeed.zero_optimizaton.stage=2"], "parallel.deepspeed.zero_optimizaton"),
    ],
)  # fmt: skip
def test_no_traceback_in_a_fresh_interpreter(tmp_path, tiny_model_dir, sets, needle):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_model_dir, tmp_path))
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli(str(path), *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_model_cli_in_a_fresh_interpreter(tmp_path, tiny_model_dir):
    import subprocess

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    _random_header(broken)
    for module, argv in [
        ("launcher.shifcon_infer", ["generate", str(broken), "--prompt", "hi"]),
        ("launcher.evaluate", ["--model", str(broken), "--languages", "en"]),
    ]:
        proc = subprocess.run([sys.executable, "-m", module, *argv], cwd=ROOT, env=clean_env(),
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "model.safetensors has a corrupt safetensors header" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_yaml_is_only_read_safely(tmp_path, capsys):
    """A python tag in a recipe is a YAML error, not an object."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.dump({"name": "a", "training": {"steps": object()}}))
    _expect_rejected(capsys, run_main([str(path)]), "r.yaml", "invalid YAML")
