"""What the user points at (:class:`Sources`), and the names and limits of source strings."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from ..errors import UserError
from ..settings import Opt

DEMO_PREFIX = "demo:"
TASKS = ("auto", "causal-lm", "classifier", "encoder", "regression")
IMAGE_MODES = ("RGB", "L")
SPLITS = ("calibration", "validation", "evaluation")


@dataclass(frozen=True)
class Sources:
    """What the user pointed at: a model source, its weights, a data source and options."""

    model: Annotated[
        str,
        Opt(
            "model source: demo:minilm, demo:digits-cnn, a Hugging Face / sentence-transformers "
            "folder, a TorchScript file, or module:function (or file.py:function) that builds "
            "the nn.Module (with --weights); any of them may be s3://bucket/key",
            metavar="SRC",
            required=True,
        ),
    ]
    data: Annotated[
        str | None,
        Opt(
            "data source: a text file (one sentence per line, for Hugging Face encoders), an "
            "ImageFolder folder (root/<class>/<image>), or tensors in .safetensors/.npz (key x, "
            "optional y labels), .npy (x) or .pt (a tensor or {'x', 'y'}, read weights-only); "
            "optional for the demos. Samples are split in thirds by a seeded permutation: "
            "calibration, validation, evaluation",
            metavar="SRC",
        ),
    ] = None
    weights: Annotated[
        str | None,
        Opt(
            "weights for a module:function model: .safetensors, or a .pt/.pth/.bin state_dict "
            "(loaded with torch.load(weights_only=True))",
            metavar="FILE",
        ),
    ] = None
    task: Annotated[
        Literal["auto", "causal-lm", "classifier", "encoder", "regression"],
        Opt(
            "how to run and compare the model: causal-lm (perplexity, top-1 agreement and KL "
            "of next-token predictions), classifier (top-1), encoder (embedding cosine "
            "and nearest-neighbour agreement), regression (relative MSE of outputs); auto picks "
            "from the source: the demo's task, causal-lm for Hugging Face decoders, encoder for "
            "other Hugging Face folders, classifier when "
            "the data has labels or the model returns (batch, classes) scores, else regression"
        ),
    ] = "auto"
    image_size: Annotated[
        int | None,
        Opt(
            "resize ImageFolder images to N x N (default: keep; they must then share one size)",
            metavar="N",
        ),
    ] = None
    image_mode: Annotated[
        Literal["RGB", "L"],
        Opt("ImageFolder colour mode: RGB (3 channels) or L (grey, 1 channel)"),
    ] = "RGB"

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
