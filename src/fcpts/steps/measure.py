"""What evaluate measures besides quality: the size of the files allocate wrote and the
speed of dense and sparse side by side."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .. import speed
from ..errors import UserError
from ..export import sparse_format
from ..export.folder import COMPRESSED_FILE
from ..speed_onnx import files_in
from ..tasks import Task


def sizes(dense: nn.Module, manifest: Mapping[str, Any], sparse_dir: Path) -> dict[str, Any]:
    """The dense safetensors' size and the size of the sparse model file that allocate
    wrote (its dense weights, or with ``--save compressed`` the bitmask+values file)."""
    with tempfile.TemporaryDirectory(prefix="fcpts-size-") as tmp:
        dense_path = Path(tmp) / "dense.safetensors"
        state = {k: v.detach().cpu().contiguous().clone() for k, v in dense.state_dict().items()}
        save_file(state, str(dense_path))
        dense_bytes = dense_path.stat().st_size
        del state
    model_file = str(manifest.get("model_file", "model.safetensors"))
    sparse_bytes = (Path(sparse_dir) / model_file).stat().st_size
    compressed = model_file.endswith(COMPRESSED_FILE)
    return {
        "format": sparse_format.FORMAT_NAME
        if compressed
        else str(manifest.get("model_format", "safetensors (dense)")),
        "format_description": sparse_format.FORMAT_DESCRIPTION
        if compressed
        else "the file allocate wrote, pruned weights stored as zeros",
        "file": model_file,
        "dense_format": "safetensors (dense)",
        "dense_bytes": dense_bytes,
        "sparse_bytes": sparse_bytes,
        "ratio": dense_bytes / sparse_bytes,
    }


def latency(
    dense: nn.Module,
    sparse: nn.Module,
    task: Task,
    batch: Any,
    settings: tuple[float, tuple[str, ...], int],
    dev: torch.device,
    folder: str | os.PathLike,
    manifest: Mapping[str, Any],
) -> dict[str, Any]:
    """Dense and sparse timed side by side per engine (:func:`fcpts.speed.compare`); the
    headline figures (dense_ms, sparse_ms, ratio) are torch's, or the first engine's."""
    seconds, engines, repeats = settings
    result = speed.compare(
        dense,
        sparse,
        batch,
        engines=engines,
        repeats=repeats,
        warmup=1,
        device=dev.type,
        seconds=max(0.0, float(seconds)),
        task=task,
        onnx_files=files_in(pruned=folder),
    )
    if not result["engines"]:
        raise UserError(
            f"no speed engine could time the models ({result['skipped']}): choose others "
            f"with --latency-engines (from {', '.join(speed.ENGINES)})"
        )
    return speed.headline(result, str(manifest.get("structure") or "unstructured"))
