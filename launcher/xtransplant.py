"""XTransplant: cross-lingual transplant of one layer's feed-forward (or attention) output.

Method (DESIGN.md, "XTransplant specification"). Run the auxiliary prompt (e.g. the English
version of the question) once and record, at every decoder layer, the output of the ``mlp``
(or ``self_attn``) module at the last prompt token. Run the main prompt; at target layer j,
during prefill only, replace that position's module output with the recorded output of source
layer i. Layers are 0-based indices into ``model.model.layers``; the module output is what the
layer adds to the residual stream, so the transplant swaps one layer's contribution and leaves
the residual path intact.

Directions: ``en2x`` (aux = pivot language, main = target language: multilingual tasks) and
``x2en`` (aux = target language, main = pivot: culture tasks). Scores are always against the
main prompt's gold answer.

Mechanics. A forward hook on the module replaces ``output[b, positions[b]]`` (the first element
when the module returns a tuple, as ``self_attn`` does with sdpa and eager alike). The hook is
armed once per run and only fires on a call whose sequence length is the prompt's: the prefill.
Decode steps (length 1 with a KV cache) pass untouched, so later tokens see the transplant only
through the cached keys and values of the prompt, as in the method.

Offline search (``search``): for each language, every (i, j) is scored on a dev split; the best
pair is applied unchanged to a test split; the upper bound counts a test instance solved if any
pair solves it. Work units are (language, split, target layer j): one unit runs, per instance,
ONE forward (or one ``generate``) of a batch of B = number of source layers copies of the main
prompt, row b transplanting source layer ``sources[b]``. The copies share everything before the
last prompt token (causal attention, and the transplant sits on that token), so the prompt
prefix is run once and its KV cache repeated B times: a batch costs one prompt plus B tokens
(plus the choices or the decoding), not B prompts. Units spread over Ray actors (one model per
actor) or run in-process; both run the same ``PairSearchWorker.run_unit``.

CLI: ``python -m launcher.xtransplant --model DIR --task mgsm --languages sw --dev 20 --test 20 --ray``
or ``--config recipes/xtransplant/xtransplant_smollm2.yaml`` (flags override the file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from model.layers import decoder_layers

Site = Literal["mlp", "attn"]
SITES: tuple[str, ...] = ("mlp", "attn")
_SITE_ATTR = {"mlp": "mlp", "attn": "self_attn"}
ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Hooks: recording and transplanting
# --------------------------------------------------------------------------------------------


def site_module(model: nn.Module, layer: int, site: Site) -> nn.Module:
    if site not in _SITE_ATTR:
        raise ValueError(f"site must be one of {SITES}, got {site!r}")
    layers = decoder_layers(model)
    if not 0 <= layer < len(layers):
        raise ValueError(f"layer {layer} out of range: the model has layers 0..{len(layers) - 1}")
    return getattr(layers[layer], _SITE_ATTR[site])


def _hidden(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _rows(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(n, device=device)


@torch.inference_mode()
def record_outputs(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    site: Site = "mlp",
) -> torch.Tensor:
    """``[B, L, D]``: every layer's ``site`` output at ``positions[b]`` of row b (one forward)."""
    layers = decoder_layers(model)
    captured: list[torch.Tensor | None] = [None] * len(layers)
    handles = []

    def make_hook(index: int):
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            hidden = _hidden(output)
            pos = positions.to(hidden.device)
            captured[index] = hidden[_rows(hidden.shape[0], hidden.device), pos].detach().clone()

        return hook

    for index in range(len(layers)):
        handles.append(site_module(model, index, site).register_forward_hook(make_hook(index)))
    try:
        device = next(model.parameters()).device
        decoder = model.model if hasattr(model, "model") else model
        decoder(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    finally:
        for handle in handles:
            handle.remove()
    if any(c is None for c in captured):
        raise RuntimeError("a decoder layer did not run: cannot record every layer")
    return torch.stack([c for c in captured if c is not None], dim=1)


@dataclass
class TransplantHandle:
    """What the hook did: ``applied`` prefill replacements, ``passed`` calls left untouched."""

    calls: int = 0
    applied: int = 0
    passed: int = 0


@contextmanager
def transplant(
    model: nn.Module,
    target_layer: int,
    vectors: torch.Tensor,
    positions: torch.Tensor,
    *,
    site: Site = "mlp",
    prompt_len: int | None = None,
) -> Iterator[TransplantHandle]:
    """Replace ``site`` output of ``target_layer`` at ``positions[b]`` by ``vectors[b]``.

    Fires once, on the first call whose sequence length is ``prompt_len`` (any length when
    None): the prefill of a ``generate`` or the single forward of a scoring pass. Every other
    call (decode steps) passes through unchanged and is counted in the handle.
    """
    module = site_module(model, target_layer, site)
    if vectors.dim() != 2 or positions.dim() != 1 or vectors.shape[0] != positions.shape[0]:
        raise ValueError(
            f"need vectors [B, D] and positions [B], got {tuple(vectors.shape)}, "
            f"{tuple(positions.shape)}"
        )
    handle = TransplantHandle()
    armed = True

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        nonlocal armed
        handle.calls += 1
        hidden = _hidden(output)
        if not armed or (prompt_len is not None and hidden.shape[1] != prompt_len):
            handle.passed += 1
            return None
        if hidden.shape[0] != vectors.shape[0]:
            raise ValueError(
                f"transplant batch mismatch: {vectors.shape[0]} vectors for a batch of "
                f"{hidden.shape[0]} rows"
            )
        armed = False
        handle.applied += 1
        new = hidden.clone()
        rows = _rows(new.shape[0], new.device)
        new[rows, positions.to(new.device)] = vectors.to(device=new.device, dtype=new.dtype)
        return _with_hidden(output, new)

    registered = module.register_forward_hook(hook)
    try:
        yield handle
    finally:
        registered.remove()


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_layers(spec: str | Sequence[int] | None, n_layers: int) -> list[int]:
    """``None``/"all" -> every layer; "3-9" (inclusive), "0-29:3" (step), "1,5,7", or a list."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "all")):
        return list(range(n_layers))
    if isinstance(spec, str):
        layers: list[int] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            step = 1
            if ":" in part:
                part, step_text = part.split(":", 1)
                step = int(step_text)
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                layers += list(range(lo, hi + 1, step))
            else:
                layers.append(int(part))
    else:
        layers = [int(x) for x in spec]
    bad = [x for x in layers if not 0 <= x < n_layers]
    if bad or not layers:
        raise ValueError(f"layers {spec!r}: need indices in 0..{n_layers - 1}, got {layers}")
    return sorted(set(layers))


@dataclass
class XTransplantConfig:
    """Everything the search needs; the YAML file given to ``--config`` holds these keys."""

    model: str = ""
    task: Literal["xcopa", "mgsm"] = "mgsm"
    languages: list[str] = field(default_factory=lambda: ["sw"])
    data_dir: str | None = None
    pivot: str = "en"
    direction: Literal["en2x", "x2en"] = "en2x"
    site: Site = "mlp"
    dev: int = 20
    test: int = 20
    source_layers: str | list[int] | None = None
    target_layers: str | list[int] | None = None
    max_new_tokens: int = 128
    mgsm_template: str = "{question}"
    chat: bool = True
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    batch_size: int = 8  # recording batch of aux prompts
    ray: bool = False
    ray_address: str | None = None
    workers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster: each actor holds one model on one GPU
    upper_bound: bool = True
    out: str = "runs/xtransplant"
    tracking_uri: str | None = None
    track: bool = False
    experiment: str = "polyshift-xtransplant"

    def __post_init__(self) -> None:
        checks = {
            "task": self.task in ("xcopa", "mgsm"),
            "direction": self.direction in ("en2x", "x2en"),
            "site": self.site in SITES,
            "dev": isinstance(self.dev, int) and self.dev >= 1,
            "test": isinstance(self.test, int) and self.test >= 0,
            "max_new_tokens": isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
            "workers": isinstance(self.workers, int) and self.workers >= 1,
            "cpus_per_worker": self.cpus_per_worker > 0,
            "gpus_per_worker": self.gpus_per_worker >= 0,
            "languages": bool(self.languages) and all(isinstance(x, str) for x in self.languages),
            "mgsm_template": "{question}" in self.mgsm_template,
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"{name}: invalid value {getattr(self, name)!r}")
        if self.pivot in self.languages:
            raise ValueError(f"languages: the pivot {self.pivot!r} cannot also be a target")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], source: str = "config") -> XTransplantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key(s) {unknown}; known: {sorted(known)}")
        data = dict(values)
        if isinstance(data.get("languages"), str):
            data["languages"] = [x.strip() for x in data["languages"].split(",") if x.strip()]
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from None


# --------------------------------------------------------------------------------------------
# Instances
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    """One benchmark item: the main prompt (scored) and the aux prompt (recorded).

    XCOPA: ``main``/``aux`` are connector contexts and ``choices`` the main-language
    continuations; ``gold`` is the label. MGSM: ``main``/``aux`` are user prompts (chat
    formatted by the worker) and ``gold`` the numeric answer.
    """

    key: int
    main: str
    aux: str
    gold: float
    choices: tuple[str, ...] = ()


def build_instances(config: XTransplantConfig, lang: str) -> dict[str, list[Instance]]:
    """Aligned aux/main instances of ``lang``, split into the first ``dev`` and next ``test``.

    Languages are aligned by the XCOPA ``idx`` field or by position in MGSM files (the same
    problems in the same order). A pivot file (e.g. ``xcopa/en.jsonl``) must exist.
    """
    from eval.benchmarks import benchmark_file, load_mgsm, load_xcopa, shared_data_dir
    from eval.tasks import mgsm_prompt, xcopa_request

    data_dir = shared_data_dir(config.data_dir)
    main_lang, aux_lang = (
        (lang, config.pivot) if config.direction == "en2x" else (config.pivot, lang)
    )
    loader = load_xcopa if config.task == "xcopa" else load_mgsm
    main_rows = loader(benchmark_file(data_dir, config.task, main_lang))
    aux_rows = {r.idx: r for r in loader(benchmark_file(data_dir, config.task, aux_lang))}
    instances: list[Instance] = []
    for row in main_rows:
        aux = aux_rows.get(row.idx)
        if aux is None:
            continue
        if config.task == "xcopa":
            context, choices = xcopa_request(row)
            instances.append(Instance(row.idx, context, xcopa_request(aux)[0], row.label, choices))
        else:
            instances.append(
                Instance(
                    row.idx,
                    mgsm_prompt(row.question, config.mgsm_template),
                    mgsm_prompt(aux.question, config.mgsm_template),
                    row.answer,
                )
            )
    need = config.dev + config.test
    if len(instances) < need:
        raise ValueError(
            f"{config.task}/{lang}: {len(instances)} aligned {main_lang}/{aux_lang} rows, "
            f"need dev + test = {need}"
        )
    return {"dev": instances[: config.dev], "test": instances[config.dev : need]}


# --------------------------------------------------------------------------------------------
# Worker: one model, scores units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A slice of the search: one language, one split, one target layer (None = no transplant)."""

    lang: str
    split: str
    target: int | None


@dataclass
class UnitResult:
    unit: Unit
    sources: list[int]
    correct: list[list[bool]]  # [instance][source] (one column for the baseline)
    seconds: float = 0.0


class PairSearchWorker:
    """Holds one model; records aux outputs (cached per language/split) and scores units.

    ``batch_sources`` False scores each source layer in its own forward: the naive loop the
    batched path must equal (kept for tests and for models too large for B copies).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        task: str,
        site: Site = "mlp",
        max_new_tokens: int = 128,
        chat: bool = True,
        batch_size: int = 8,
        batch_sources: bool = True,
    ) -> None:
        from eval.scorer import HFScorer

        if task not in ("xcopa", "mgsm"):
            raise ValueError(f"task must be xcopa or mgsm, got {task!r}")
        self.scorer = HFScorer(model, tokenizer, batch_size=batch_size, chat=chat)
        self.model = model
        self.task = task
        self.site: Site = site
        self.max_new_tokens = max_new_tokens
        self.batch_sources = batch_sources
        self.num_layers = len(decoder_layers(model))
        self._recorded: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def load(cls, model_spec: str, *, dtype: str = "float32", attn: str = "sdpa", **kwargs: Any):
        """Build a worker from a model spec (what each Ray actor does on its own node)."""
        from eval.scorer import load_model

        model, tokenizer = load_model(
            model_spec, dtype=getattr(torch, dtype), attn_implementation=attn
        )
        return cls(model, tokenizer, **kwargs)

    # -- recording ------------------------------------------------------------------------------

    def _aux_ids(self, inst: Instance) -> list[int]:
        if self.task == "xcopa":
            return self.scorer.encode_text(inst.aux)
        return self.scorer.prompt_ids(inst.aux)

    def record(self, instances: Sequence[Instance]) -> torch.Tensor:
        """``[N, L, D]`` site outputs at each aux prompt's last token (batched, right-padded)."""
        from eval.scorer import right_pad

        out: list[torch.Tensor] = []
        size = self.scorer.batch_size
        for start in range(0, len(instances), size):
            seqs = [self._aux_ids(inst) for inst in instances[start : start + size]]
            ids, mask = right_pad(seqs, self.scorer.pad_id)
            positions = torch.tensor([len(s) - 1 for s in seqs])
            out.append(record_outputs(self.model, ids, mask, positions, self.site).cpu())
        return torch.cat(out)

    def recorded(self, key: tuple[str, str], instances: Sequence[Instance]) -> torch.Tensor:
        if key not in self._recorded:
            self._recorded[key] = self.record(instances)
        return self._recorded[key]

    # -- scoring -------------------------------------------------------------------------------

    def run_unit(
        self, unit: Unit, instances: Sequence[Instance], sources: Sequence[int]
    ) -> UnitResult:
        """Correctness of every instance for every source layer at ``unit.target``."""
        began = time.perf_counter()
        recorded = self.recorded((unit.lang, unit.split), instances)
        correct = []
        for n, inst in enumerate(instances):
            if unit.target is None:
                correct.append(self.score(inst, None, None))
            elif self.batch_sources:
                correct.append(self.score(inst, unit.target, recorded[n, list(sources)]))
            else:
                row: list[bool] = []
                for s in sources:
                    row += self.score(inst, unit.target, recorded[n, [s]])
                correct.append(row)
        srcs = [] if unit.target is None else list(sources)
        return UnitResult(unit, srcs, correct, time.perf_counter() - began)

    @torch.inference_mode()
    def score(self, inst: Instance, target: int | None, vectors: torch.Tensor | None) -> list[bool]:
        """One forward/generate over B = len(vectors) copies of the main prompt (1 if None)."""
        if self.task == "xcopa":
            return self.choice_correct(inst, target, vectors)
        from eval.answers import extract_number, numbers_match

        texts = self.generate(inst, target, vectors)
        return [numbers_match(extract_number(t), inst.gold) for t in texts]

    def _prefix_cache(self, prefix: Sequence[int], copies: int) -> Any:
        """KV cache of the prompt minus its last token, repeated for ``copies`` rows.

        Everything before the last prompt token is the same in every copy (the transplant only
        touches the last position, and attention is causal), so it is computed once; each row
        then runs only its last token (and, for XCOPA, its continuation) on top.
        """
        ids = torch.tensor([list(prefix)], device=self.scorer.device)
        cache = self.model.model(input_ids=ids, use_cache=True).past_key_values
        cache.batch_repeat_interleave(copies)
        return cache

    @torch.inference_mode()
    def choice_logprobs(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> torch.Tensor:
        """``[B, C]`` log-likelihood of each choice for each of the B transplant rows."""
        from eval.scorer import continuation_logprob, right_pad

        copies = 1 if vectors is None else vectors.shape[0]
        ctx = self.scorer.encode_text(inst.main)
        conts = [self.scorer.encode_pair(inst.main, c)[1] for c in inst.choices]
        if len(ctx) < 2 or len(ctx) + max(map(len, conts)) > self.scorer.max_length + 1:
            raise ValueError(f"instance {inst.key}: context of {len(ctx)} tokens does not fit")
        n_choices = len(conts)
        # Row (b, c): the context's last token, then choice c; scored on choice c's tokens.
        seqs = [[ctx[-1], *cont] for _ in range(copies) for cont in conts]
        ids, _ = right_pad([s[:-1] for s in seqs], self.scorer.pad_id)
        device = self.scorer.device
        cache = self._prefix_cache(ctx[:-1], len(seqs))
        if target is None or vectors is None:
            logits = self.model(input_ids=ids.to(device), past_key_values=cache).logits
        else:
            rows = vectors.repeat_interleave(n_choices, dim=0)
            zeros = torch.zeros(len(seqs), dtype=torch.long)  # the last prompt token leads
            with transplant(self.model, target, rows, zeros, site=self.site,
                            prompt_len=ids.shape[1]):  # fmt: skip
                logits = self.model(input_ids=ids.to(device), past_key_values=cache).logits
        scores = [
            continuation_logprob(logits[r], seqs[r], len(seqs[r]) - 1).logprob
            for r in range(len(seqs))
        ]
        return torch.tensor(scores, dtype=torch.float64).view(copies, n_choices)

    def choice_correct(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> list[bool]:
        out = []
        for scores in self.choice_logprobs(inst, target, vectors).tolist():
            pred = max(range(len(scores)), key=lambda c: (scores[c], -c))  # ties: first choice
            out.append(pred == int(inst.gold))
        return out

    @torch.inference_mode()
    def generate(
        self, inst: Instance, target: int | None, vectors: torch.Tensor | None
    ) -> list[str]:
        """Greedy answers of B copies of the main prompt, row b transplanted by vectors[b]."""
        copies = 1 if vectors is None else vectors.shape[0]
        prompt = self.scorer.prompt_ids(inst.main)
        if len(prompt) < 2:
            raise ValueError(f"instance {inst.key}: a prompt needs at least 2 tokens")
        ids = torch.tensor([prompt] * copies, dtype=torch.long)
        mask = torch.ones_like(ids)
        cache = self._prefix_cache(prompt[:-1], copies)
        # With the prefix cached, generate's prefill is the last prompt token alone (length 1);
        # the hook is one-shot, so the decode steps after it (also length 1) pass untouched.
        if target is None or vectors is None:
            new = self.scorer.generate_ids(ids, mask, self.max_new_tokens, past_key_values=cache)
        else:
            zeros = torch.zeros(copies, dtype=torch.long)
            with transplant(self.model, target, vectors, zeros, site=self.site, prompt_len=1):
                new = self.scorer.generate_ids(
                    ids, mask, self.max_new_tokens, past_key_values=cache
                )
        return [self.scorer.decode(row) for row in new]


# --------------------------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------------------------


@dataclass
class LanguageResult:
    """Search outcome of one language; accuracies are fractions of instances."""

    lang: str
    sources: list[int]
    targets: list[int]
    dev_grid: list[list[float]]  # [source][target] accuracy on dev
    test_grid: list[list[float]] | None  # same on test (None without the upper bound)
    best_pair: tuple[int, int]  # (source i, target j), chosen on dev
    dev_best: float
    dev_baseline: float
    test_best: float  # the dev-chosen pair applied unchanged to test
    test_baseline: float
    dev_upper_bound: float
    test_upper_bound: float | None
    n_dev: int
    n_test: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else math.nan


def _grid(results: Mapping[int, UnitResult], sources: Sequence[int], targets: Sequence[int]):
    """[instance][source][target] correctness from the per-target units."""
    n = len(next(iter(results.values())).correct)
    return [
        [[results[t].correct[k][s] for t in targets] for s in range(len(sources))] for k in range(n)
    ]


def _accuracy_grid(
    cube: list[list[list[bool]]], n_sources: int, n_targets: int
) -> list[list[float]]:
    return [
        [_mean([inst[s][t] for inst in cube]) for t in range(n_targets)] for s in range(n_sources)
    ]


def _upper_bound(cube: list[list[list[bool]]]) -> float:
    return _mean([any(any(row) for row in inst) for inst in cube])


def best_pair(
    grid: list[list[float]], sources: Sequence[int], targets: Sequence[int]
) -> tuple[int, int]:
    """Highest dev accuracy; ties go to the lowest target layer, then the lowest source layer."""
    cells = [(s, t) for t in range(len(targets)) for s in range(len(sources))]
    s, t = max(cells, key=lambda c: (grid[c[0]][c[1]], -c[1], -c[0]))
    return sources[s], targets[t]


def init_local_ray(num_cpus: int) -> None:
    """A private local Ray bound to 127.0.0.1, whose workers can import this repository.

    ``ray.init(_node_ip_address="127.0.0.1")`` alone is not enough on Linux: Ray 2.x maps a
    loopback address to the machine's routable one unless its cluster mode is off, which it
    reads from ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` (into ``ray_constants`` at import). Both
    are switched off just for the start-up (Ray's own processes inherit the environment) and
    restored afterwards.
    """
    import ray

    try:
        from ray._private import ray_constants
    except ImportError:  # pragma: no cover - a Ray without that module: best effort
        ray_constants = None
    key = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
    saved_env = os.environ.get(key)
    saved_flag = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[key] = "0"
    if saved_flag is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH")) if x)
    try:
        ray.init(
            num_cpus=num_cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            logging_level="WARNING",
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    finally:
        if saved_env is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved_env
        if saved_flag is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved_flag


class _Executor:
    """Runs units in-process (one worker) or on Ray actors (one model each)."""

    def __init__(self, config: XTransplantConfig, worker: PairSearchWorker | None) -> None:
        self.config = config
        self.worker = worker
        self.owns_ray = False
        self.actors: list[Any] = []
        self.refs: dict[tuple[str, str], Any] = {}

    def __enter__(self) -> _Executor:
        if not self.config.ray:
            if self.worker is None:
                self.worker = _load_worker(self.config)
            return self
        import ray

        if not ray.is_initialized():
            self.owns_ray = True
            if self.config.ray_address:
                ray.init(address=self.config.ray_address, logging_level="WARNING")
            else:
                init_local_ray(self.config.workers)
        actor_cls = ray.remote(
            num_cpus=self.config.cpus_per_worker, num_gpus=self.config.gpus_per_worker
        )(_RayWorker)
        self.actors = [actor_cls.remote(asdict(self.config)) for _ in range(self.config.workers)]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.actors:
            import ray

            for actor in self.actors:
                ray.kill(actor)
            self.actors = []
            if self.owns_ray:
                ray.shutdown()

    def run(
        self,
        units: Sequence[Unit],
        instances: Mapping[tuple[str, str], list[Instance]],
        sources: Sequence[int],
    ) -> list[UnitResult]:
        if not self.config.ray:
            assert self.worker is not None
            return [self.worker.run_unit(u, instances[(u.lang, u.split)], sources) for u in units]
        import ray
        from ray.util import ActorPool

        for key, items in instances.items():
            if key not in self.refs:
                self.refs[key] = ray.put(items)
        pool = ActorPool(self.actors)
        # Same (language, split) units go to the same actors first, so recordings are reused.
        ordered = sorted(units, key=lambda u: (u.lang, u.split))
        results = list(
            pool.map_unordered(
                lambda actor, u: actor.run_unit.remote(
                    u, self.refs[(u.lang, u.split)], list(sources)
                ),
                ordered,
            )
        )
        by_unit = {r.unit: r for r in results}
        return [by_unit[u] for u in units]


class _RayWorker:
    """Ray actor body: loads the model once, then serves units."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.worker = _load_worker(XTransplantConfig(**config))

    def run_unit(self, unit: Unit, instances: list[Instance], sources: list[int]) -> UnitResult:
        return self.worker.run_unit(unit, instances, sources)


def _load_worker(config: XTransplantConfig) -> PairSearchWorker:
    if not config.model:
        raise ValueError("model: give a model directory or backbone spec")
    return PairSearchWorker.load(
        config.model,
        dtype=config.dtype,
        attn=config.attn_implementation,
        task=config.task,
        site=config.site,
        max_new_tokens=config.max_new_tokens,
        chat=config.chat,
        batch_size=config.batch_size,
    )


def _num_layers(config: XTransplantConfig, worker: PairSearchWorker | None) -> int:
    if worker is not None:
        return worker.num_layers
    from transformers import AutoConfig

    from config.schema import ModelSection
    from model.backbone import resolve_backbone

    path = resolve_backbone(ModelSection(backbone=config.model)).path
    return int(AutoConfig.from_pretrained(path).num_hidden_layers)


def search(
    config: XTransplantConfig,
    instances: Mapping[str, Mapping[str, list[Instance]]] | None = None,
    worker: PairSearchWorker | None = None,
) -> dict[str, LanguageResult]:
    """Pair search for every language of ``config``; ``instances[lang][split]`` or read from data.

    ``worker`` (in-process mode only) reuses an already loaded model.
    """
    if instances is None:
        instances = {lang: build_instances(config, lang) for lang in config.languages}
    n_layers = _num_layers(config, worker)
    sources = parse_layers(config.source_layers, n_layers)
    targets = parse_layers(config.target_layers, n_layers)
    by_key = {
        (lang, split): items
        for lang, splits in instances.items()
        for split, items in splits.items()
    }
    splits = ["dev", "test"] if config.upper_bound else ["dev"]
    units = [Unit(lang, split, t) for lang in instances for split in splits for t in targets]
    units += [Unit(lang, split, None) for lang in instances for split in ("dev", "test")]
    out: dict[str, LanguageResult] = {}
    with _Executor(config, worker) as executor:
        done = {r.unit: r for r in executor.run(units, by_key, sources)}
        if not config.upper_bound:  # only the dev-chosen target layer runs on test
            chosen = {}
            for lang in instances:
                cube = _grid({t: done[Unit(lang, "dev", t)] for t in targets}, sources, targets)
                chosen[lang] = best_pair(
                    _accuracy_grid(cube, len(sources), len(targets)), sources, targets
                )
            extra = [Unit(lang, "test", chosen[lang][1]) for lang in instances]
            done.update({r.unit: r for r in executor.run(extra, by_key, sources)})
    for lang in instances:
        dev_cube = _grid({t: done[Unit(lang, "dev", t)] for t in targets}, sources, targets)
        dev_grid = _accuracy_grid(dev_cube, len(sources), len(targets))
        i, j = best_pair(dev_grid, sources, targets)
        test_unit = done[Unit(lang, "test", j)]
        test_best = _mean([row[sources.index(i)] for row in test_unit.correct])
        test_grid = test_ub = None
        if config.upper_bound:
            test_cube = _grid({t: done[Unit(lang, "test", t)] for t in targets}, sources, targets)
            test_grid = _accuracy_grid(test_cube, len(sources), len(targets))
            test_ub = _upper_bound(test_cube)
        out[lang] = LanguageResult(
            lang=lang,
            sources=list(sources),
            targets=list(targets),
            dev_grid=dev_grid,
            test_grid=test_grid,
            best_pair=(i, j),
            dev_best=dev_grid[sources.index(i)][targets.index(j)],
            dev_baseline=_mean([r[0] for r in done[Unit(lang, "dev", None)].correct]),
            test_best=test_best,
            test_baseline=_mean([r[0] for r in done[Unit(lang, "test", None)].correct]),
            dev_upper_bound=_upper_bound(dev_cube),
            test_upper_bound=test_ub,
            n_dev=len(instances[lang]["dev"]),
            n_test=len(instances[lang]["test"]),
        )
    return out


# --------------------------------------------------------------------------------------------
# Reporting and CLI
# --------------------------------------------------------------------------------------------


def heatmap(result: LanguageResult, path: str | Path, title: str = "") -> Path:
    """Accuracy per (source, target) pair: dev (and test) panels, the chosen pair starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("dev", result.dev_grid)] + ([("test", result.test_grid)] if result.test_grid else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    i, j = result.best_pair
    for ax, (name, grid) in zip(axes[0], panels, strict=True):
        image = ax.imshow(grid, origin="lower", aspect="auto", vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(result.targets)), [str(t) for t in result.targets], fontsize=6)
        ax.set_yticks(range(len(result.sources)), [str(s) for s in result.sources], fontsize=6)
        ax.set_xlabel("target layer j (main prompt)")
        ax.set_ylabel("source layer i (aux prompt)")
        baseline = result.dev_baseline if name == "dev" else result.test_baseline
        ax.set_title(f"{title}{result.lang} {name} (no transplant {baseline:.2f})", fontsize=8)
        ax.plot(result.targets.index(j), result.sources.index(i), marker="*", color="red", ms=12)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_table(results: Mapping[str, LanguageResult]) -> str:
    lines = [
        "| lang | best (i, j) | dev best | dev base | test best | test base | test upper bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for lang, r in results.items():
        ub = "-" if r.test_upper_bound is None else f"{r.test_upper_bound:.3f}"
        lines.append(
            f"| {lang} | ({r.best_pair[0]}, {r.best_pair[1]}) | {r.dev_best:.3f} | "
            f"{r.dev_baseline:.3f} | {r.test_best:.3f} | {r.test_baseline:.3f} | {ub} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launcher.xtransplant", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", help="YAML with XTransplantConfig keys (flags override it)")
    p.add_argument("--model")
    p.add_argument("--task", choices=("xcopa", "mgsm"))
    p.add_argument("--data-dir", dest="data_dir")
    p.add_argument("--languages", help="comma-separated target languages")
    p.add_argument("--pivot")
    p.add_argument("--direction", choices=("en2x", "x2en"))
    p.add_argument("--site", choices=SITES)
    p.add_argument("--dev", type=int)
    p.add_argument("--test", type=int)
    p.add_argument("--source-layers", dest="source_layers", help='"all", "0-29:3", "4,8,12"')
    p.add_argument("--target-layers", dest="target_layers")
    p.add_argument("--max-new-tokens", dest="max_new_tokens", type=int)
    p.add_argument("--ray", action="store_const", const=True, default=None)
    p.add_argument("--ray-address", dest="ray_address")
    p.add_argument("--workers", type=int)
    p.add_argument(
        "--no-upper-bound", dest="upper_bound", action="store_const", const=False, default=None
    )
    p.add_argument("--out")
    p.add_argument("--tracking-uri", dest="tracking_uri")
    p.add_argument("--track", action="store_const", const=True, default=None)
    return p


def config_from_args(argv: Sequence[str] | None = None) -> XTransplantConfig:
    args = vars(_parser().parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config")
    if config_path:
        import yaml

        loaded = yaml.safe_load(Path(config_path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{config_path}: expected a mapping of XTransplantConfig keys")
        values.update(loaded)
    values.update({k: v for k, v in args.items() if v is not None})
    return XTransplantConfig.from_mapping(values, source=config_path or "arguments")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = config_from_args(argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from eval.benchmarks import BenchmarkError

    try:
        instances = {lang: build_instances(config, lang) for lang in config.languages}
    except (BenchmarkError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    began = time.perf_counter()
    results = search(config, instances)
    seconds = time.perf_counter() - began
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    charts = [heatmap(r, out / f"heatmap_{config.task}_{lang}.png") for lang, r in results.items()]
    payload = {"config": asdict(config), "seconds": seconds,
               "languages": {lang: r.to_dict() for lang, r in results.items()}}  # fmt: skip
    (out / "xtransplant.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False))
    table = summary_table(results)
    print(table)
    print(f"wrote {out / 'xtransplant.json'} and {len(charts)} heatmap(s) in {seconds:.1f} s")
    if config.track or config.tracking_uri:
        from launcher.tracking import Tracker

        with Tracker(enabled=True, is_rank0=True, tracking_uri=config.tracking_uri,
                     experiment=config.experiment, run_name=f"xtransplant-{config.task}",
                     log_system_metrics=False) as tracker:  # fmt: skip
            tracker.start(params={"xtransplant": asdict(config)})
            for lang, r in results.items():
                tracker.log_metrics(
                    {f"xtransplant/{lang}/dev_best": r.dev_best,
                     f"xtransplant/{lang}/test_best": r.test_best,
                     f"xtransplant/{lang}/test_baseline": r.test_baseline,
                     f"xtransplant/{lang}/test_upper_bound": r.test_upper_bound or math.nan,
                     f"xtransplant/{lang}/best_source": r.best_pair[0],
                     f"xtransplant/{lang}/best_target": r.best_pair[1]},
                    step=0,
                )  # fmt: skip
            tracker.log_text(table, "xtransplant/summary.md")
            tracker.log_dict(payload, "xtransplant/xtransplant.json")
            for chart in charts:
                tracker.log_artifact(chart, "xtransplant")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
