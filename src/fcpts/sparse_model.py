"""Apply an allocation to a model, describe it in a manifest, save and load it.

The sparse model is saved in its source's own format (:mod:`fcpts.export.folder`: a
Hugging Face or sentence-transformers folder, a TorchScript file, or a state_dict in
``model.safetensors``, pruned weights written as zeros), with ``model.onnx`` and
``manifest.json``. Loading reads safetensors or TorchScript: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from . import __version__
from .alloc.base import Allocation
from .digests import sha256_file
from .errors import UserError
from .export import sparse_format
from .export.folder import (
    COMPRESSED_FILE,
    FILE_MODE,
    MODEL_FILE,
    TORCHSCRIPT_FILE,
    SourceFormat,
    files,
    write_folder,
)
from .export.onnx import FILE_NAME as ONNX_FILE
from .export.onnx import export_onnx
from .metrics import round_half_up, sparsity_figures, state_zeros  # noqa: F401 (round_half_up re-exported)
from .structure.saved import rebuild

log = logging.getLogger(__name__)
MANIFEST_FILE = "manifest.json"


@torch.no_grad()
def apply_allocation(model: nn.Module, allocation: Allocation) -> nn.Module:
    """A copy of ``model`` with the allocation's zeros (and reconstructed weights) written in."""
    sparse = copy.deepcopy(model)
    params = dict(sparse.named_parameters())
    for name, value in (allocation.params or {}).items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    for layer in allocation.layers:
        weight = sparse.get_submodule(layer.name).weight
        if allocation.weights and layer.name in allocation.weights:
            weight.copy_(allocation.weights[layer.name].to(weight.device, weight.dtype))
        # masked_fill, not a product: a pruned weight is 0 even where it was NaN or inf
        weight.masked_fill_(~allocation.masks[layer.name].to(weight.device), 0)
    return sparse


def manifest(allocation: Allocation, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON description of an allocation: per layer and global figures, method, settings.

    :func:`save_sparse` recounts the zeros in the weights it writes, so a saved manifest's
    figures are those of the written model.
    """
    layers = [
        {
            "name": layer.name,
            "shape": list(layer.shape),
            "numel": layer.numel,
            "zeros": layer.zeros,
            "sparsity": layer.sparsity,
            "existing_zeros": layer.existing,
            "threshold": None if layer.threshold != layer.threshold else layer.threshold,
        }
        for layer in allocation.layers
    ]
    data: dict[str, Any] = {
        "format": "fcpts.manifest/1",
        "fcpts_version": __version__,
        "target": allocation.target,
        **sparsity_figures(layers, allocation.target),
        "existing_zeros": sum(layer.existing for layer in allocation.layers),
        "method": allocation.method,
        "score": allocation.score,
        "settings": _jsonable(allocation.settings),
        "weights_reconstructed": bool(allocation.weights),
        "seconds": allocation.seconds,
        "layers": layers,
    }
    if extra:
        data.update(extra)
    return data


def counted(data: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``data`` (a manifest) with its zeros, sparsities and global figures counted in the
    weights of ``state``."""
    if "layers" not in data:
        return data
    found = state_zeros(state, [layer["name"] for layer in data["layers"]])
    layers = [
        dict(layer, zeros=c["zeros"], sparsity=c["sparsity"])
        for layer, c in zip(data["layers"], found, strict=True)
    ]
    return dict(data, layers=layers, **sparsity_figures(found, float(data["target"])))


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sparse(
    model: nn.Module,
    data: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    source: SourceFormat | None = None,
    compressed: bool = False,
    example: tuple[tuple, dict] | None = None,
) -> Path:
    """Write the model in its source's format (:func:`fcpts.export.folder.write_folder`),
    ``model.onnx`` when ``example`` (the ``(args, kwargs)`` of one call) is given, and
    ``manifest.json`` (with the model file's name and sha256) to out_dir.

    ``compressed`` writes the prunable layers' weights as bitmask+values
    (:mod:`fcpts.export.sparse_format`) instead of dense; no ONNX file then (it would hold
    the dense weights). The manifest's zeros (per layer and overall), achieved sparsity,
    ``exact`` and ``empty_layers`` are counted in the tensors written. The manifest is
    written last, so a folder with a manifest always holds a complete model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    params = [f"{layer['name']}.weight" for layer in data.get("layers", [])]
    written = write_folder(model, out, source, compressed=params if compressed else None)
    data = dict(counted(data, state), **written)
    data["model_sha256"] = sha256_file(out / written["model_file"])
    data["onnx"] = _onnx(model, out, example, compressed)
    data["files"] = files(out)
    _atomic_write(out / MANIFEST_FILE, lambda p: Path(p).write_text(json.dumps(data, indent=2)))
    return out


def _onnx(
    model: nn.Module, out: Path, example: tuple[tuple, dict] | None, compressed: bool
) -> dict[str, Any]:
    """Export ``model.onnx``; on failure none is written and the reason is returned."""
    if compressed:
        reason = "not written with --save compressed: it would hold the dense weights"
        return {"file": None, "reason": reason}
    if example is None:
        return {"file": None, "reason": "no example input to trace"}
    start = time.perf_counter()
    try:
        path = export_onnx(model, out, *example)
    except Exception as exc:  # any exporter failure: the folder stays usable without it
        (out / ONNX_FILE).unlink(missing_ok=True)
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        log.warning("model.onnx not written: %s", reason)
        return {"file": None, "reason": reason}
    os.chmod(path, FILE_MODE)
    return {"file": path.name, "seconds": round(time.perf_counter() - start, 3)}


def read_manifest(sparse_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(sparse_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(
            f"{sparse_dir} holds no {MANIFEST_FILE}: point to the --out folder of `fcpts allocate`"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); rerun `fcpts allocate`") from None


def load_state(
    sparse_dir: str | os.PathLike, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The saved state_dict and manifest; checks the file's sha256 against the manifest.

    Reads a folder's ``model.safetensors`` (a state_dict or a transformers
    ``save_pretrained`` file), its compressed form, or its TorchScript ``model.pt``."""
    data = read_manifest(sparse_dir)
    path = Path(sparse_dir) / data.get("model_file", MODEL_FILE)
    if not path.is_file():
        raise UserError(
            f"{path} is missing: the sparse model folder is incomplete; rerun `fcpts allocate`"
        )
    if verify and data.get("model_sha256") and sha256_file(path) != data["model_sha256"]:
        raise UserError(
            f"{path} does not match the sha256 in its manifest: the file is corrupt or was changed"
        )
    try:
        if path.name == COMPRESSED_FILE:
            return sparse_format.unpack(path), data
        if path.name == TORCHSCRIPT_FILE:
            scripted = torch.jit.load(str(path), map_location="cpu")
            return {k: v.detach() for k, v in scripted.state_dict().items()}, data
        return load_file(str(path)), data
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{path} is not a readable model file ({exc})") from None


def load_sparse(
    model: nn.Module, sparse_dir: str | os.PathLike
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved sparse model into a copy of ``model`` (same architecture)."""
    state, data = load_state(sparse_dir)
    sparse = rebuild(model, data)  # a units folder: cut down to its recorded shapes
    try:
        _load_into(sparse, state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"the sparse model in {sparse_dir} does not fit this model: {first}"
        ) from None
    return sparse, data


def _load_into(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict`` that accepts a file without a tied weight (``save_pretrained``
    leaves out e.g. an output embedding that shares the input embedding's storage)."""
    result = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    untied = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if result.unexpected_keys or untied:
        raise RuntimeError(
            f"missing keys {untied[:3]}, unexpected keys {result.unexpected_keys[:3]}"
        )
