"""sha256 digests of files, tensors and JSON values: one function each.

Pure: no I/O beyond reading the file given to :func:`sha256_file`; torch is imported only
by the tensor digests, so the file digests cost nothing to import.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

CHUNK = 1024 * 1024


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Hex sha256 of a string's UTF-8 bytes."""
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON value (keys sorted, so equal values share a digest)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def update_tensor(h: Any, label: str, tensor: Any) -> None:
    """Feed ``label|dtype|shape|`` and the tensor's bytes to the hash ``h``."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h.update(f"{label}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def tensors_sha256(named: Iterable[tuple[str, Any]]) -> str:
    """Hex sha256 of (name, tensor) pairs in the given order: names, dtypes, shapes, bytes."""
    h = hashlib.sha256()
    for name, tensor in named:
        update_tensor(h, name, tensor)
    return h.hexdigest()
