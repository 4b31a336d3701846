"""A demo bundles a real model, its task, its data splits and sensible layer choices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..core import LayerSelection
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
    tokenizer: Any = None  # the text demos' tokenizer, for user text data
    folder: Path | None = None  # the model's Hugging Face folder, when it has one
