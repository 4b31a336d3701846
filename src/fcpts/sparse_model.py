"""Apply an allocation to a model, describe it in a manifest, save and load it.

The sparse model is saved as ``model.safetensors`` (the whole state_dict under the source
model's own parameter names, pruned weights written as zeros) beside ``manifest.json``.
Loading reads safetensors only: nothing is ever unpickled.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .alloc.base import Allocation
from .digests import sha256_file
from .errors import UserError
from .metrics import round_half_up, sparsity_figures, state_zeros  # noqa: F401 (round_half_up re-exported)
from .structure.saved import rebuild

MODEL_FILE = "model.safetensors"
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
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_sparse(model: nn.Module, data: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors`` and ``manifest.json`` (with the model's sha256) to out_dir.

    The manifest's zeros (per layer and overall), achieved sparsity, ``exact`` and
    ``empty_layers`` are counted in the tensors written.

    Each file is written to a temporary name and renamed, the manifest last, so a folder
    with a manifest always holds a complete model.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    model_path = out / MODEL_FILE
    _atomic_write(model_path, lambda p: save_file(state, p, metadata={"format": "pt"}))
    data = dict(counted(data, state), model_file=MODEL_FILE, model_sha256=sha256_file(model_path))
    _atomic_write(out / MANIFEST_FILE, lambda p: Path(p).write_text(json.dumps(data, indent=2)))
    return out


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
    """The saved state_dict and manifest; checks the file's sha256 against the manifest."""
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
        return load_file(str(path)), data
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path} is not a readable safetensors file ({exc})") from None


def load_sparse(
    model: nn.Module, sparse_dir: str | os.PathLike
) -> tuple[nn.Module, dict[str, Any]]:
    """Load a saved sparse model into a copy of ``model`` (same architecture)."""
    state, data = load_state(sparse_dir)
    sparse = rebuild(model, data)  # a units folder: cut down to its recorded shapes
    try:
        sparse.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(
            f"the sparse model in {sparse_dir} does not fit this model: {first}"
        ) from None
    return sparse, data
