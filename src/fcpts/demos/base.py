"""A demo bundles a real model, its task, its data splits and sensible layer choices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..core import LayerSelection
from ..errors import UserError
from ..tasks import Task


@dataclass
class Demo:
    name: str
    model: nn.Module
    task: Task
    # split(name, n, batch_size) -> list of batches; "calibration", "validation", "evaluation"
    split: Callable[[str, int, int], list[Any]]
    selection: LayerSelection = field(default_factory=LayerSelection)
    defaults: dict[str, Any] = field(default_factory=dict)


def _minilm() -> Demo:
    from .minilm import load

    return load()


def _digits() -> Demo:
    from .digits import load

    return load()


DEMOS: dict[str, Callable[[], Demo]] = {"minilm": _minilm, "digits-cnn": _digits}


def load_demo(name: str) -> Demo:
    key = name.removeprefix("demo:")
    if key not in DEMOS:
        raise UserError(
            f"unknown demo {name!r}: choose one of {', '.join('demo:' + k for k in DEMOS)}"
        )
    return DEMOS[key]()
