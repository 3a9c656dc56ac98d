"""XTransplant offline pair search: every (i, j) on dev, the best applied to test, upper bound.

For each language, every (source i, target j) is scored on a dev split; the best pair is applied
unchanged to a test split; the upper bound counts a test instance solved if any pair solves it.
Units (language, split, target layer j) spread over Ray actors (one model per actor) or run
in-process; both run the same ``PairSearchWorker.run_unit``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launcher.xtransplant_config import (
    Instance,
    XTransplantConfig,
    build_instances,
    parse_layers,
)
from launcher.xtransplant_worker import PairSearchWorker, Unit, UnitResult

ROOT = Path(__file__).resolve().parent.parent


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
