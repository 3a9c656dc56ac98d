"""XTransplant search settings (the ``--config`` YAML keys) and the benchmark instances it scores."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from methods.xtransplant import SITES, Site


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
