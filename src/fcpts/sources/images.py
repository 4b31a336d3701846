"""Images of ImageFolder sources turned into tensors: read in ``--image-mode``, then
resized (shorter side to ``--image-size``), center-cropped (``--center-crop``), scaled to
[0, 1] and normalised (``--mean``, ``--std``); or handed to the user's ``--transform``.

The resize and crop follow torchvision's ``Resize(int)`` and ``CenterCrop`` on PIL images
(PIL's bilinear filter, the same rounding), written with PIL and numpy only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .files import first_line, import_callable
from .models import parse_function_source
from .spec import Sources, channel_values

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass(frozen=True)
class ImagePrep:
    """How one image becomes a (channels, height, width) float tensor."""

    mode: str = "RGB"
    size: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    transform: Callable[[Any], Any] | None = None
    transform_name: str | None = None

    @classmethod
    def of(cls, sources: Sources) -> ImagePrep:
        channels = 3 if sources.image_mode == "RGB" else 1
        transform = None
        if sources.transform:
            parsed = parse_function_source(sources.transform.strip())
            if parsed is None:
                raise UserError(
                    f"--transform takes module:function or file.py:function, got {sources.transform!r}"
                )
            transform = import_callable(*parsed, "--transform", "--transform")
        return cls(
            mode=sources.image_mode,
            size=sources.image_size,
            crop=sources.center_crop,
            mean=channel_values(sources.mean, "--mean", channels),
            std=channel_values(sources.std, "--std", channels),
            transform=transform,
            transform_name=sources.transform,
        )

    def read(self, path: Path) -> torch.Tensor:
        """The tensor of the image file ``path``; a UserError naming it when it cannot be
        read or preprocessed."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                img = opened.convert(self.mode)
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"image {path} cannot be read ({first_line(exc)})") from None
        if self.transform is not None:
            return self._transformed(img, path)
        if self.size:
            img = resize_shorter(img, self.size)
        if self.crop:
            img = center_crop(img, self.crop, path)
        return normalise(to_tensor(img), self.mean, self.std)

    def _transformed(self, img: Any, path: Path) -> torch.Tensor:
        try:
            out = self.transform(img)
        except Exception as exc:
            raise UserError(
                f"--transform {self.transform_name} failed on {path}: {first_line(exc)}"
            ) from None
        if isinstance(out, np.ndarray):
            out = torch.from_numpy(np.ascontiguousarray(out))
        if not isinstance(out, torch.Tensor) or out.dim() != 3:
            shown = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UserError(
                f"--transform {self.transform_name} must return a (channels, height, width) "
                f"tensor, returned {shown} for {path}"
            )
        if not out.dtype.is_floating_point:
            raise UserError(
                f"--transform {self.transform_name} must return floats, returned {out.dtype} "
                f"for {path}: convert with .float() (and scale) inside it"
            )
        return out.float().contiguous()


def resize_shorter(img: Any, size: int) -> Any:
    """``img`` resized (bilinear) so its shorter side is ``size``, the longer one scaled in
    proportion and truncated, as torchvision's ``Resize(size)``."""
    from PIL import Image

    width, height = img.size
    if width <= height:
        new = (size, int(size * height / width))
    else:
        new = (int(size * width / height), size)
    return img if new == img.size else img.resize(new, Image.BILINEAR)


def center_crop(img: Any, size: int, path: Path) -> Any:
    """The central ``size`` x ``size`` pixels (offsets rounded as torchvision's
    ``CenterCrop``); a UserError when the image is smaller."""
    width, height = img.size
    if size > width or size > height:
        raise UserError(
            f"--center-crop {size} is larger than image {path} ({width} x {height} after "
            "resizing): pass a smaller --center-crop or an --image-size of at least it"
        )
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_tensor(img: Any) -> torch.Tensor:
    """(channels, height, width) float32 in [0, 1] from a PIL image."""
    arr = np.asarray(img, dtype=np.float32) / 255.0
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()


def normalise(
    t: torch.Tensor, mean: tuple[float, ...] | None, std: tuple[float, ...] | None
) -> torch.Tensor:
    if mean is not None:
        t = t - torch.tensor(mean, dtype=t.dtype).view(-1, 1, 1)
    if std is not None:
        t = t / torch.tensor(std, dtype=t.dtype).view(-1, 1, 1)
    return t
