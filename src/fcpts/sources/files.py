"""Reading the files sources name: local paths for S3 URIs, and tensors that are never
unpickled (safetensors, or ``torch.load(weights_only=True)``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UserError


def local_path(source: str) -> Path:
    """The local file or folder a path or an ``s3://`` URI names (S3: downloaded into
    the cache first; see :func:`fcpts.storage.cache.fetch`)."""
    from ..storage.cache import fetch, is_s3_uri

    return fetch(source) if is_s3_uri(source) else Path(source).expanduser()


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 400 characters), for a UserError."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def read_safetensors(path: Path, shown: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; ``shown`` names it in the error."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{shown} is not a readable safetensors file ({first_line(exc)})") from None


def torch_load(path: Path) -> Any:
    """A torch file read with ``weights_only=True``: tensors and plain containers only."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # UnpicklingError for non-tensor content, RuntimeError for corrupt zips
        raise UserError(
            f"{path} cannot be read as weights-only torch data ({first_line(exc)}); "
            "fcpts never unpickles arbitrary objects: save tensors only, or use safetensors"
        ) from None
