"""What the user points at (:class:`Sources`), and the names and limits of source strings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UserError

DEMO_PREFIX = "demo:"
TASKS = ("auto", "classifier", "encoder", "regression")
IMAGE_MODES = ("RGB", "L")
SPLITS = ("calibration", "validation", "evaluation")


@dataclass(frozen=True)
class Sources:
    """What the user pointed at: a model source, its weights, a data source and options."""

    model: str
    data: str | None = None
    weights: str | None = None
    task: str = "auto"
    image_size: int | None = None
    image_mode: str = "RGB"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("no model source given: pass --model (e.g. demo:digits-cnn)")
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.image_mode not in IMAGE_MODES:
            raise UserError(
                f"unknown image mode {self.image_mode!r}: choose RGB (3 channels) or L (grey)"
            )
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or self.image_size <= 0
        ):
            raise UserError(f"--image-size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sources:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
