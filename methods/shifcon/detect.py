"""Prompt language detection for ShifCon's `--lang auto`: three detectors, one feature.

The feature is the pooled unshifted H_f of the prompt over its content span (the one pooling
definition, `data.formatting.content_mask`), the quantity the language vectors v^X_f average.

- ``centroid``: nearest v^X_f (Euclidean). Needs nothing but the vectors.
- ``linear``: multinomial logistic regression on standardised features, fitted at training time
  on the vector samples (the same forward that makes the vectors) and saved with the export as
  plain tensors (`DETECTOR_FILE`, safetensors; nothing is unpickled).
- ``langid``: py3langid on the prompt text, restricted to the trained languages: no forward.

``auto`` uses ``linear`` when the export has it, else ``centroid``. `detect-eval` measures all.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor

DETECTOR_FILE = "shifcon_detector.safetensors"
DETECTORS = ("centroid", "linear", "langid")


class LinearDetector:
    """softmax(W standardise(x) + b) over the trained languages; plain tensors only."""

    def __init__(self, weight: Tensor, bias: Tensor, mean: Tensor, scale: Tensor) -> None:
        if weight.dim() != 2 or bias.shape != weight.shape[:1]:
            raise ValueError(
                f"detector: weight [K, D] and bias [K], got {weight.shape}, {bias.shape}"
            )
        if mean.shape != weight.shape[1:] or scale.shape != weight.shape[1:]:
            raise ValueError("detector: mean and scale must be [D]")
        self.weight, self.bias = weight.double(), bias.double()
        self.mean, self.scale = mean.double(), scale.double()

    @classmethod
    def fit(
        cls, features: Tensor, labels: Tensor, num_classes: int, l2: float = 1e-2
    ) -> LinearDetector:
        """Full-batch L-BFGS on the standardised features: deterministic, a second on CPU."""
        x = features.detach().double().cpu()
        y = labels.detach().long().cpu()
        if x.dim() != 2 or y.shape != x.shape[:1] or x.shape[0] == 0:
            raise ValueError(f"detector: need features [N, D] and labels [N], got {x.shape}")
        mean = x.mean(0)
        scale = x.std(0, unbiased=False).clamp(min=1e-6)
        z = (x - mean) / scale
        weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(z @ weight.t() + bias, y) + l2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        return cls(weight.detach(), bias.detach(), mean, scale)

    def predict(self, features: Tensor) -> Tensor:
        z = (features.detach().double().cpu() - self.mean) / self.scale
        return (z @ self.weight.t() + self.bias).argmax(dim=1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight, "bias": self.bias, "mean": self.mean, "scale": self.scale}

    def save(self, directory: Path) -> Path:
        path = Path(directory) / DETECTOR_FILE
        save_file({k: v.float().contiguous() for k, v in self.state_dict().items()}, str(path))
        return path

    @classmethod
    def load(cls, directory: Path) -> LinearDetector | None:
        path = Path(directory) / DETECTOR_FILE
        if not path.is_file():
            return None
        t = load_file(str(path))
        return cls(t["weight"], t["bias"], t["mean"], t["scale"])


def nearest_centroid(features: Tensor, centroids: Tensor) -> Tensor:
    """Index of the nearest language vector (Euclidean, raw stream) per row."""
    return torch.cdist(features.double(), centroids.double().to(features.device)).argmin(dim=1)


class TextLanguageID:
    """py3langid restricted to the trained languages (its model ships as .npz, not a pickle)."""

    def __init__(self, languages: Sequence[str]) -> None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        self.identifier = LanguageIdentifier.from_model_file(MODEL_FILE)
        self.identifier.set_languages(list(languages))

    def __call__(self, texts: Sequence[str]) -> list[str]:
        return [self.identifier.classify(t)[0] for t in texts]
