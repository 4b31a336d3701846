"""What the user points at (:class:`Sources`), and the names and limits of source strings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from ..errors import UserError
from ..settings import Opt

DEMO_PREFIX = "demo:"
TASKS = ("auto", "causal-lm", "classifier", "encoder", "regression")
IMAGE_MODES = ("RGB", "L")
SPLITS = ("calibration", "validation", "evaluation")
DATA_FIELDS = ("data", *(f"{split}_data" for split in SPLITS))  # the fields naming data


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
            "optional for the demos. Its samples are split in thirds by a seeded permutation "
            "(calibration, validation, evaluation) for each split that has no source of its own",
            metavar="SRC",
        ),
    ] = None
    calibration_data: Annotated[
        str | None,
        Opt(
            "the calibration split's own data source (any form --data takes), used whole "
            "(default: the first third of --data)",
            metavar="SRC",
        ),
    ] = None
    validation_data: Annotated[
        str | None,
        Opt(
            "the validation split's own data source (sweeps score trials on it), used whole "
            "(default: the second third of --data)",
            metavar="SRC",
        ),
    ] = None
    evaluation_data: Annotated[
        str | None,
        Opt(
            "the evaluation split's own data source, used whole (default: the last third of "
            "--data)",
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
            "resize ImageFolder images so that their shorter side is N pixels, keeping the "
            "aspect ratio (bilinear; default: keep the size)",
            metavar="N",
        ),
    ] = None
    center_crop: Annotated[
        int | None,
        Opt(
            "crop the central N x N pixels of each ImageFolder image, after --image-size "
            "(default: no crop; the images must then share one size)",
            metavar="N",
        ),
    ] = None
    mean: Annotated[
        str | None,
        Opt(
            "normalise ImageFolder images: subtract this mean per channel from the values in "
            "[0, 1], e.g. 0.485,0.456,0.406 (three values for RGB, one for L; default: 0)",
            metavar="R,G,B",
        ),
    ] = None
    std: Annotated[
        str | None,
        Opt(
            "normalise ImageFolder images: divide by this standard deviation per channel, "
            "after --mean, e.g. 0.229,0.224,0.225 (default: 1)",
            metavar="R,G,B",
        ),
    ] = None
    transform: Annotated[
        str | None,
        Opt(
            "preprocess ImageFolder images with your own function instead: module:function or "
            "file.py:function, called with each PIL image (in --image-mode) and returning a "
            "(channels, height, width) float tensor, e.g. a torchvision transform pipeline",
            metavar="MODULE:FUNCTION",
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
        for name in ("image_size", "center_crop"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value <= 0
            ):
                raise UserError(f"{flag_of(name)} must be a positive integer, got {value!r}")
        channels = 3 if self.image_mode == "RGB" else 1
        for name in ("mean", "std"):
            values = channel_values(getattr(self, name), flag_of(name), channels)
            if values is not None:
                object.__setattr__(self, name, ",".join(repr(v) for v in values))
        if self.std and any(v == 0 for v in channel_values(self.std, "", channels)):
            raise UserError(f"--std must not hold a zero, got {self.std}")
        preprocessing = [
            flag_of(n) for n in ("image_size", "center_crop", "mean", "std") if getattr(self, n)
        ]
        if self.transform and preprocessing:
            raise UserError(
                f"--transform replaces {', '.join(preprocessing)}: give the transform alone "
                "(resize, crop and normalise inside it) or drop --transform"
            )

    def split_source(self, split: str) -> tuple[str, str | None]:
        """The flag and the source of the data for ``split``: its own source when given,
        else ``--data`` (split in thirds; None: none given)."""
        own = getattr(self, f"{split}_data")
        if own is not None and str(own).strip():
            return flag_of(f"{split}_data"), str(own).strip()
        return "--data", self.data.strip() if self.data and self.data.strip() else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sources:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def flag_of(field: str) -> str:
    """The command-line flag of a field of :class:`Sources` (its config key and KFP
    parameter is the field's name)."""
    return "--" + field.replace("_", "-")


def channel_values(
    value: str | Sequence[float] | None, flag: str, channels: int
) -> tuple[float, ...] | None:
    """Per-channel numbers from ``"0.485,0.456,0.406"`` (commas or spaces) or a sequence;
    one value is used for every channel. A UserError naming ``flag`` otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    try:
        numbers = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        raise UserError(f"{flag} takes numbers separated by commas, got {value!r}") from None
    if not all(math.isfinite(v) for v in numbers):
        raise UserError(f"{flag} takes finite numbers, got {value!r}")
    if len(numbers) == 1:
        numbers = numbers * channels
    if len(numbers) != channels:
        raise UserError(
            f"{flag} needs {channels} value{'s' if channels > 1 else ''} (one per channel of "
            f"--image-mode {'RGB' if channels == 3 else 'L'}), got {len(numbers)}: {value!r}"
        )
    return numbers
