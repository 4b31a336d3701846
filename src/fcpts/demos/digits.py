"""A small CNN with BatchNorm trained on scikit-learn's load_digits (8x8 handwritten digits).

Trained on first use in a few seconds and cached under $XDG_CACHE_HOME/fcpts (or
~/.cache/fcpts); the train split is disjoint from the calibration, validation and
evaluation splits.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UserError
from ..tasks import ClassifierTask
from .base import Demo

SEED = 0
# 1797 images: 897 train, then 300 each for calibration, validation and evaluation
SPLITS = {
    "train": (0, 897),
    "calibration": (897, 1197),
    "validation": (1197, 1497),
    "evaluation": (1497, 1797),
}


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _shuffled_digits() -> dict[str, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("demo:digits-cnn needs scikit-learn: pip install 'fcpts[demo]'") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    return {"x": x[order].contiguous(), "y": y[order].contiguous()}


def _cached(path: Path, make, valid=lambda tensors: True) -> dict[str, torch.Tensor]:
    """The tensors in ``path``, else ``make()`` written there atomically (a corrupt,
    unreadable or not ``valid`` cache is remade, not trusted; concurrent writers each write
    a whole file)."""
    if path.is_file():
        try:
            tensors = load_file(str(path))
        except Exception:
            tensors = None
        if tensors is not None and valid(tensors):
            return tensors
        path.unlink(missing_ok=True)
    tensors = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    return tensors


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as (N, 1, 8, 8) floats in [0, 1] and labels, in a fixed shuffled order
    (read from scikit-learn once, then from the cache: importing scikit-learn costs about
    2 CPU seconds in every step process)."""
    tensors = _cached(cache_dir() / "digits-data-v1.safetensors", _shuffled_digits, _is_digits)
    return tensors["x"], tensors["y"]


def _is_digits(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether cached tensors have the demo data's layout (all 1797 images, 8x8 floats)."""
    x, y = tensors.get("x"), tensors.get("y")
    if x is None or y is None:
        return False
    return (
        tuple(x.shape) == (SPLITS["evaluation"][1], 1, 8, 8)
        and tuple(y.shape) == (SPLITS["evaluation"][1],)
        and x.dtype == torch.float32
        and y.dtype == torch.int64
    )


def split(name: str, n: int, batch_size: int) -> list[dict[str, Any]]:
    if name not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}")
    x, y = data()
    lo, hi = SPLITS[name]
    n = min(n, hi - lo)
    xs, ys = x[lo : lo + n], y[lo : lo + n]
    return [
        {"x": xs[i : i + batch_size], "y": ys[i : i + batch_size]} for i in range(0, n, batch_size)
    ]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fcpts"


def train(epochs: int = 40) -> DigitsCNN:
    torch.manual_seed(SEED)
    model = DigitsCNN()
    batches = split("train", 10_000, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for b in batches:
            opt.zero_grad()
            loss_fn(model(b["x"]), b["y"]).backward()
            opt.step()
    return model.eval()


def trained_model() -> DigitsCNN:
    path = cache_dir() / "digits-cnn-v1.safetensors"
    model = DigitsCNN()
    try:
        model.load_state_dict(_cached(path, lambda: train().state_dict()))
    except RuntimeError:  # a cache of another shape is retrained, not trusted
        path.unlink(missing_ok=True)
        model.load_state_dict(_cached(path, lambda: train().state_dict()))
    return model.eval()


def load() -> Demo:
    return Demo(
        name="digits-cnn",
        model=trained_model(),
        task=ClassifierTask(),
        split=split,
        defaults={"calibration_samples": 300, "evaluation_samples": 300, "batch_size": 64},
    )
