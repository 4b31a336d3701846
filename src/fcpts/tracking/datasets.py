"""Calibration and evaluation batches as MLflow dataset inputs: digest, arrays, source."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ..digests import tensors_sha256
from ..errors import UserError
from .redaction import redact


def _batch_tensors(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"x": batch}
    if isinstance(batch, np.ndarray):
        return {"x": torch.from_numpy(batch)}
    if isinstance(batch, Mapping):
        return {str(k): v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if isinstance(batch, (list, tuple)):
        return {f"input_{i}": v for i, v in enumerate(batch) if isinstance(v, torch.Tensor)}
    raise UserError(
        f"cannot log a dataset of {type(batch).__name__} batches: give tensors or dicts of tensors"
    )


def batches_digest(batches: Sequence[Any]) -> str:
    """16 hex digits of the sha256 of every tensor of every batch (key, dtype, shape, bytes)."""
    return tensors_sha256(kt for b in batches for kt in sorted(_batch_tensors(b).items()))[:16]


def batches_numpy(batches: Sequence[Any]) -> dict[str, np.ndarray] | None:
    """All batches concatenated per key, or None when they do not line up (ragged)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        tensors = _batch_tensors(batch)
        if parts and set(tensors) != set(parts):
            return None
        for key, t in tensors.items():
            parts.setdefault(key, []).append(t.detach().to("cpu").numpy())
    try:
        return {k: np.concatenate(v) for k, v in parts.items()} or None
    except (ValueError, TypeError):
        return None


def dataset_source(source: Any):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if isinstance(source, DatasetSource):
        return source
    text = redact(source)
    if "://" in text:
        with contextlib.suppress(Exception):
            return resolve_dataset_source(text)
    # built-in demos and other sources MLflow has no resolver for
    return CodeDatasetSource(tags={"fcpts.source": text})
