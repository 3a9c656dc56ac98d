"""Layer probe: per-layer language means -> subspace distance curve -> ShifCon band [f, b].

Runs a backbone over multilingual probe samples, accumulates per-layer language means of the
raw residual stream with `LanguageStats` (one all-reduce when distributed), computes the
subspace distance per layer (`methods/subspace.py`; this project's own metric, see docs/methods.md),
chooses the band with `select_band`, and scores each layer by nearest-centroid language
identification (held-out samples) and bitext retrieval (parallel pairs).

Works on a plain HF model and on the DeepSpeed engine's ``forward_module`` (ZeRO-3): every
rank runs the same number of forwards (a rank short of work repeats a batch and discards it).

CLI: ``python -m launcher.probe --model BACKBONE --pairs SOURCE --languages en,fr,sw --out DIR``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.batching import even_rounds
from data.formatting import content_mask, right_pad
from methods.shifcon.math import LanguageStats, all_reduce_, pooled_mean
from methods.subspace import (
    bitext_retrieval_accuracy,
    language_id_accuracy,
    mean_distance_per_layer,
    per_layer_distances,
    select_band,
)
from model.layers import capture_layers, device_of, rank_world, unwrap

PROBE_FILE = "probe.json"
PLOT_FILE = "probe.png"
DEFINITION = (
    "Our own metric (the ShifCon paper's exact formula was not available): per layer l, the "
    "language means v^X_l (token means of the raw residual stream H_l over content tokens: the "
    "instruction's own tokens, no first position, no chat template) are "
    "centred; a rank-(K-1) SVD gives the language-specific basis U; "
    "d_l(X) = ||U^T (v^X_l - v^en_l)|| / ||v^en_l||. The band is the longest contiguous run of "
    "layers (excluding layer 1 and layer L) whose mean distance over the non-dominant languages "
    "is within `tolerance` (relative) of the minimum. Language-ID: nearest centroid (cosine) of "
    "mean-pooled H_l, centroids from the first half of each language's samples, scored on the "
    "second half. Bitext: mean-pooled H_l of English vs target sentences, cosine nearest "
    "neighbour among that language's pairs."
)


@dataclass
class ProbeInputs:
    """Unique token sequences and what they stand for.

    ``samples``: (sequence index, language id) of the samples behind the language means and the
    language-ID score. ``pairs``: (English sequence, target sequence, target language id).
    """

    languages: list[str]  # dominant first
    sequences: list[list[int]] = field(default_factory=list)
    # [start, end) pooled per sequence (`data.formatting.content_mask`: the one pooling
    # definition; default every position but the first)
    spans: list[tuple[int, int]] = field(default_factory=list)
    samples: list[tuple[int, int]] = field(default_factory=list)
    pairs: list[tuple[int, int, int]] = field(default_factory=list)
    _index: dict[tuple[int, ...], int] = field(default_factory=dict, repr=False)

    def _seq(self, ids: Sequence[int], span: tuple[int, int] | None = None) -> int:
        key = tuple(int(i) for i in ids)
        if not key:
            raise ValueError("probe: an empty token sequence")
        if key not in self._index:
            self._index[key] = len(self.sequences)
            self.sequences.append(list(key))
            self.spans.append(tuple(span) if span is not None else (1, len(key)))
        return self._index[key]

    def add_sample(
        self, lang: str, ids: Sequence[int], span: tuple[int, int] | None = None
    ) -> None:
        self.samples.append((self._seq(ids, span), self.languages.index(lang)))

    def add_pair(
        self,
        lang: str,
        en_ids: Sequence[int],
        target_ids: Sequence[int],
        en_span: tuple[int, int] | None = None,
        target_span: tuple[int, int] | None = None,
    ) -> None:
        en, target = self._seq(en_ids, en_span), self._seq(target_ids, target_span)
        self.pairs.append((en, target, self.languages.index(lang)))


def build_inputs(
    languages: Sequence[str],
    samples: Sequence[tuple],
    pairs: Sequence[tuple],
    per_language: int,
) -> ProbeInputs:
    """The first ``per_language`` samples (and pairs) of every language, in a fixed order.

    ``samples``: (lang, ids[, span]); ``pairs``: (lang, en ids, target ids[, en span, target
    span]); spans as in `ProbeInputs.spans`."""
    inputs = ProbeInputs(list(languages))
    taken = dict.fromkeys(languages, 0)
    for lang, ids, *span in samples:
        if lang in taken and taken[lang] < per_language:
            taken[lang] += 1
            inputs.add_sample(lang, ids, *span)
    missing = [lang for lang, n in taken.items() if n == 0]
    if missing:
        raise ValueError(f"probe: no samples for language(s) {missing}")
    taken = dict.fromkeys(languages[1:], 0)
    for lang, en_ids, target_ids, *spans in pairs:
        if lang in taken and taken[lang] < per_language:
            taken[lang] += 1
            inputs.add_pair(lang, en_ids, target_ids, *spans)
    return inputs


@dataclass
class ProbeResult:
    languages: list[str]
    layers: list[int]  # 1..L (layer L is reported, never chosen)
    distances: dict[str, list[float]]  # language -> per layer
    mean_distance: list[float]
    band: tuple[int, int]
    tolerance: float
    language_id_accuracy: list[float | None]
    bitext_retrieval_accuracy: list[float | None]
    bitext_per_language: dict[str, list[float]]
    samples_per_language: dict[str, int]
    pairs_per_language: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["band"] = list(self.band)
        return {"format": 1, "definition": DEFINITION, "dominant": self.languages[0], **out}

    def save(self, directory: Path) -> list[Path]:
        """probe.json and probe.png in ``directory``; returns both paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path = directory / PROBE_FILE
        json_path.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False))
        png_path = directory / PLOT_FILE
        plot(self, png_path)
        return [json_path, png_path]

    def metrics_by_layer(self) -> dict[int, dict[str, float]]:
        """MLflow metrics per layer (the layer is the step)."""
        out: dict[int, dict[str, float]] = {}
        for j, layer in enumerate(self.layers):
            row = {"probe/mean_distance": self.mean_distance[j]}
            for lang, values in self.distances.items():
                row[f"probe/distance/{lang}"] = values[j]
            if self.language_id_accuracy[j] is not None:
                row["probe/language_id_accuracy"] = self.language_id_accuracy[j]
            if self.bitext_retrieval_accuracy[j] is not None:
                row["probe/bitext_retrieval_accuracy"] = self.bitext_retrieval_accuracy[j]
            out[layer] = row
        return out


class ProbeSums:
    """What the probe adds up over its forwards, whatever runs them: per-layer language sums
    (`LanguageStats`, every decoder layer) and the pooled H_l of every probe sequence.

    The Hugging Face path fills every layer of its own batches (`run_probe`); a megatron
    pipeline stage fills only its own layers, so a rank's sums are a share to be summed over
    the data-parallel and then the pipeline group (every (sequence, layer) is written once).
    """

    def __init__(
        self, inputs: ProbeInputs, num_layers: int, hidden: int, device: torch.device | str
    ) -> None:
        self.inputs = inputs
        self.layers = list(range(1, num_layers + 1))
        n = len(inputs.sequences)
        self.seq_lang = torch.full((n,), -1, dtype=torch.long)
        for seq, lang in inputs.samples:
            self.seq_lang[seq] = lang
        self.stats = LanguageStats.zeros(inputs.languages, self.layers, hidden, device=device)
        self.pooled = torch.zeros(n, num_layers, hidden, dtype=torch.float32, device=device)

    def batches(self, batch_size: int) -> list[list[int]]:
        """Sequence indices in batches of similar length (the same list on every rank)."""
        seqs = self.inputs.sequences
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

    def pool_mask(self, idx: Sequence[int], mask: Tensor) -> Tensor:
        """The pooled positions of these right-padded sequences (`content_mask`)."""
        span = torch.tensor([self.inputs.spans[i] for i in idx], device=mask.device)
        if bool((span[:, 0] == 0).all()):  # method.pooling: all (ablation)
            return mask
        return content_mask(mask, span[:, 0], span[:, 1])

    def add(self, layer: int, idx: Tensor, hidden: Tensor, pool: Tensor) -> None:
        """H_layer ``[n, T, D]`` of sequences `idx`; only language samples enter the means."""
        lang = self.seq_lang[idx.cpu()].to(hidden.device)
        counted = (lang >= 0).to(pool.dtype)
        self.stats.update(layer, hidden, pool * counted[:, None], lang.clamp(min=0))
        self.pooled[idx.to(self.pooled.device), layer - 1] = pooled_mean(hidden, pool).to(
            self.pooled
        )

    def all_reduce_(self, group: Any = None) -> ProbeSums:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            all_reduce_(self.stats, group)
            torch.distributed.all_reduce(self.pooled, group=group)
        return self

    def result(self, tolerance: float) -> ProbeResult:
        return _score(self.inputs, self.stats, self.pooled.cpu(), self.layers, tolerance)


@torch.no_grad()
def run_probe(
    model: nn.Module,
    inputs: ProbeInputs,
    *,
    batch_size: int = 8,
    tolerance: float = 0.1,
) -> ProbeResult:
    """Probe every decoder layer; identical on every rank (two all-reduces of rank shares)."""
    base = unwrap(model)
    n_layers = base.config.num_hidden_layers
    rank, world = rank_world()
    device = device_of(model)
    sums = ProbeSums(inputs, n_layers, base.config.hidden_size, device)
    was_training = model.training
    model.eval()
    with capture_layers(model, sums.layers) as store:
        for idx, filler in even_rounds(sums.batches(batch_size), rank, world):
            ids, mask = (t.to(device) for t in right_pad([inputs.sequences[i] for i in idx], 0))
            store.clear()
            model(input_ids=ids, attention_mask=mask, logits_to_keep=1)
            if filler:
                continue  # a filler forward: ZeRO-3 gathers are collectives
            pool = sums.pool_mask(idx, mask)
            for layer in sums.layers:
                sums.add(layer, torch.tensor(idx), store[layer], pool)
    model.train(was_training)
    return sums.all_reduce_().result(tolerance)


def _score(
    inputs: ProbeInputs, stats: LanguageStats, pooled: Tensor, layers: list[int], tolerance: float
) -> ProbeResult:
    languages = inputs.languages
    means = stats.means().cpu().transpose(0, 1)  # [Lyr, K, D]
    distances = per_layer_distances(means, dominant_idx=0)  # [Lyr, K]
    curve = mean_distance_per_layer(distances, dominant_idx=0)
    band = select_band(curve, tolerance)

    by_lang: dict[int, list[int]] = {k: [] for k in range(len(languages))}
    for seq, lang in inputs.samples:
        by_lang[lang].append(seq)
    fit = {k: seqs[: len(seqs) // 2] for k, seqs in by_lang.items()}
    held = [(s, k) for k, seqs in by_lang.items() for s in seqs[len(seqs) // 2 :]]
    can_id = all(fit[k] for k in by_lang)
    lid: list[float | None] = []
    for j in range(len(layers)):
        if not can_id:
            lid.append(None)
            continue
        centroids = torch.stack([pooled[fit[k], j].mean(0) for k in range(len(languages))])
        emb = pooled[[s for s, _ in held], j]
        labels = torch.tensor([k for _, k in held])
        lid.append(language_id_accuracy(emb, labels, centroids))

    bitext_lang: dict[str, list[float]] = {}
    for k, lang in enumerate(languages[1:], start=1):
        rows = [(e, t) for e, t, x in inputs.pairs if x == k]
        if len(rows) < 2:
            continue
        en = [e for e, _ in rows]
        tgt = [t for _, t in rows]
        bitext_lang[lang] = [
            bitext_retrieval_accuracy(pooled[en, j], pooled[tgt, j], center=True)
            for j in range(len(layers))
        ]
    bitext: list[float | None] = [
        sum(v[j] for v in bitext_lang.values()) / len(bitext_lang) if bitext_lang else None
        for j in range(len(layers))
    ]
    return ProbeResult(
        languages=list(languages),
        layers=layers,
        distances={lang: distances[:, k].tolist() for k, lang in enumerate(languages)},
        mean_distance=curve,
        band=band,
        tolerance=tolerance,
        language_id_accuracy=lid,
        bitext_retrieval_accuracy=bitext,
        bitext_per_language=bitext_lang,
        samples_per_language={lang: len(by_lang[k]) for k, lang in enumerate(languages)},
        pairs_per_language={
            lang: sum(1 for _, _, x in inputs.pairs if x == k)
            for k, lang in enumerate(languages)
            if k > 0
        },
    )


def plot(result: ProbeResult, path: Path) -> None:
    """Mean distance (left axis), language-ID and bitext accuracy (right axis), band shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = result.layers
    ax.plot(x, result.mean_distance, "o-", color="tab:blue", label="mean subspace distance")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("mean subspace distance (ours)", color="tab:blue")
    f, b = result.band
    ax.axvspan(f - 0.5, b + 0.5, color="tab:orange", alpha=0.15, label=f"band [{f}, {b}]")
    acc = ax.twinx()
    acc.set_ylim(-0.02, 1.02)
    acc.set_ylabel("accuracy")
    for values, style, colour, label in (
        (result.language_id_accuracy, "s--", "tab:green", "language-ID accuracy (held-out)"),
        (result.bitext_retrieval_accuracy, "^--", "tab:red", "bitext retrieval accuracy"),
    ):
        pts = [(layer, v) for layer, v in zip(x, values, strict=True) if v is not None]
        if pts:
            acc.plot(*zip(*pts, strict=True), style, color=colour, label=label)
    lines = ax.get_legend_handles_labels()
    more = acc.get_legend_handles_labels()
    ax.legend(
        lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.14),
        ncol=2, fontsize=8,
    )  # fmt: skip
    ax.set_title(f"layer probe: {', '.join(result.languages)} (tolerance {result.tolerance})")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # keeps the legend below the axes
    plt.close(fig)


def log_probe(tracker, result: ProbeResult, files: Sequence[Path] = ()) -> None:
    """Per-layer metrics (step = layer), the band as param and tag, the files as artifacts."""
    for layer, row in result.metrics_by_layer().items():
        tracker.log_metrics(row, layer)
    band = f"{result.band[0]},{result.band[1]}"
    tracker.log_params({"shifcon.band": band})
    tracker.set_tag("shifcon.band", band)
    for path in files:
        tracker.log_artifact(path, "probe")
