"""Helpers shared by the steps: layer selections as JSON, atomic JSON files,
step outputs that are whole or absent (:func:`write_output`) and inputs that may be in
S3 (:func:`input_folder`)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..core import LayerSelection
from ..digests import sha256_text
from ..errors import UserError
from ..storage.cache import cache_root, is_s3_uri
from ..storage.local import staging
from ..storage.outputs import fetch_output, staged_output, staged_remote

FILE_MODE = 0o644  # mkstemp creates 0600; artifacts are read by other users and tools
T = TypeVar("T")
SELECTION_FIELDS = ("include", "exclude", "keep_dense", "bounds", "min_sparsity", "max_sparsity")


def resolve_score(score: str | None, default: str = "wanda") -> str:
    """``auto`` (the library's default) is wanda whenever calibration data is at hand,
    which it always is in the steps; anything else must be a known score."""
    from ..scores import check_score

    if score in (None, "", "auto"):
        return default
    return check_score(score)


def selection_to_dict(selection: LayerSelection) -> dict[str, Any]:
    return {
        "include": list(selection.include),
        "exclude": list(selection.exclude),
        "keep_dense": list(selection.keep_dense),
        "bounds": {k: [float(lo), float(hi)] for k, (lo, hi) in dict(selection.bounds).items()},
        "min_sparsity": float(selection.min_sparsity),
        "max_sparsity": float(selection.max_sparsity),
    }


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{what} must be a list of layer-name patterns, got {value!r}")
    return tuple(v.strip() for v in value)


def _bound(value: Any, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise UserError(f"{what} must be within [0, 1], got {value}")
    return value


def selection_from_dict(
    data: Mapping[str, Any] | None, base: LayerSelection | None = None
) -> LayerSelection:
    """A LayerSelection from JSON-like data; fields left out keep ``base``'s values."""
    base = base or LayerSelection()
    if not data:
        return base
    if not isinstance(data, Mapping):
        raise UserError(f"a layer selection must be a mapping, got {type(data).__name__}")
    unknown = sorted(set(data) - set(SELECTION_FIELDS))
    if unknown:
        raise UserError(
            f"unknown layer selection field {unknown[0]!r}; fields: {', '.join(SELECTION_FIELDS)}"
        )
    fields: dict[str, Any] = {
        "include": base.include,
        "exclude": base.exclude,
        "keep_dense": base.keep_dense,
        "bounds": dict(base.bounds),
        "min_sparsity": base.min_sparsity,
        "max_sparsity": base.max_sparsity,
    }
    for key in ("include", "exclude", "keep_dense"):
        if data.get(key) is not None:
            fields[key] = _patterns(data[key], key.replace("_", "-"))
    if data.get("bounds") is not None:
        bounds = data["bounds"]
        if not isinstance(bounds, Mapping):
            raise UserError("bounds must map a layer pattern to [min, max]")
        parsed = {}
        for pattern, pair in bounds.items():
            if not isinstance(pair, (list, tuple)) or len(pair) != 2:
                raise UserError(f"bounds for {pattern!r} must be [min, max], got {pair!r}")
            parsed[str(pattern)] = (
                _bound(pair[0], f"min for {pattern!r}"),
                _bound(pair[1], f"max for {pattern!r}"),
            )
        fields["bounds"] = parsed
    for key in ("min_sparsity", "max_sparsity"):
        if data.get(key) is not None:
            fields[key] = _bound(data[key], key.replace("_", "-"))
    return LayerSelection(**fields)


def selection_from_json(text: str | None, base: LayerSelection | None = None) -> LayerSelection:
    """Parse a JSON selection (as KFP components receive it); empty means ``base``."""
    if text is None or not str(text).strip():
        return base or LayerSelection()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the layer selection is not valid JSON ({exc})") from None
    return selection_from_dict(data, base)


def settings_from_json(text: str | None) -> dict[str, Any]:
    if text is None or not str(text).strip():
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the allocator settings are not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError('the allocator settings must be a JSON object, e.g. {"iters": 100}')
    return data


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, FILE_MODE)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2, allow_nan=False, default=_default)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    return str(value)


def read_json(path: str | os.PathLike, what: str, hint: str) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist: {hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}): {hint}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a {what}: {hint}")
    return data


def recalibrate_bn(net: Any, task: Any, data: Any, manifest: Mapping[str, Any]) -> int:
    """Re-estimate ``net``'s BatchNorm statistics on the calibration samples the sparse
    model's ``manifest`` records, taken again from ``data`` (a UserError when the data no
    longer holds them); 0 when allocate recalibrated already. Returns the layers done."""
    from ..metrics import recalibrate_batchnorm
    from ..sources import sample_digests

    if manifest.get("recalibrated_batchnorm_layers"):
        return 0
    calib = manifest.get("calibration") or {}
    batches = data.split(
        "calibration", int(calib["samples"]), int(calib["batch_size"]), int(calib["seed"])
    )
    if sample_digests(batches) != list(calib.get("sample_digests") or []):
        raise UserError(
            "--recalibrate-bn needs the calibration samples the sparse model was made from: "
            "give the data (--data or --calibration-data) that calibrate was given"
        )
    return recalibrate_batchnorm(net, task, batches)


def positive_int(value: Any, what: str) -> int:
    try:
        ivalue = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a positive integer, got {value!r}") from None
    if ivalue <= 0 or (isinstance(value, float) and value != ivalue):
        raise UserError(f"{what} must be a positive integer, got {value!r}")
    return ivalue


def move(module, device):
    """``module.to(device)`` unless it is already there (models load on the CPU; moving a
    TorchScript module to where it already is warns about .grad of non-leaf tensors)."""
    import torch

    device = torch.device(device)
    current = next((p.device for p in module.parameters()), torch.device("cpu"))
    if current.type == device.type and (device.index is None or current.index == device.index):
        return module
    return module.to(device)


def is_remote(path: str | os.PathLike | None) -> bool:
    return path is not None and is_s3_uri(str(path))


def input_folder(path: str | os.PathLike) -> Path:
    """The local folder of an upstream step's output: an ``s3://`` output is downloaded
    (cached, every file checked against its sha256); a local path is returned as given."""
    return fetch_output(str(path)) if is_remote(path) else Path(path)


def input_file_or_folder(path: str | os.PathLike) -> Path:
    """Like :func:`input_folder`; an ``s3://`` URI naming one file of an output (its last
    part has a suffix, e.g. ``.../metrics.json``) is read from the output holding it."""
    if is_remote(path) and Path(str(path).rstrip("/")).suffix:
        parent, _, name = str(path).rstrip("/").rpartition("/")
        return input_folder(parent) / name
    return input_folder(path)


def write_output(dest: str | os.PathLike, write: Callable[[Path], T]) -> tuple[T, Path]:
    """Run ``write(folder)`` on an empty local folder and publish what it wrote to ``dest``
    only when it returns; return its value and a local folder holding the published files.

    * ``dest`` absent (or an empty folder): the staged folder is renamed to ``dest``.
    * ``dest`` a folder holding files (a KFP output path, a folder shared with other
      files): each written file is moved into place with ``os.replace``, whole, the
      JSON description last; files ``write``
      did not write are kept.
    * ``dest`` an ``s3://bucket/prefix``: :func:`fcpts.storage.outputs.publish` uploads
      every file and then the index; the returned folder is the local copy in the cache
      that :func:`fcpts.storage.fetch_output` reads.

    A failed ``write`` publishes nothing and removes the staged folder, so nothing that
    was in ``dest`` before is lost; staging folders that killed runs left are removed.
    """
    if is_remote(dest):
        with staged_remote(str(dest)) as stage:
            value = write(stage.folder)
        return value, stage.published
    final = Path(dest).expanduser()
    if final.exists() and not final.is_dir():
        raise UserError(f"output {final} is a file: give a folder path (a new or existing folder)")
    if not final.is_dir() or not any(final.iterdir()):
        with staged_output(final) as folder:
            value = write(folder)
        return value, final
    with staging(final.parent, final.name) as tmp:
        value = write(tmp)
        files = [p for p in tmp.rglob("*") if p.is_file()]
        order = sorted(files, key=lambda p: (p.suffix == ".json", p.stat().st_mtime_ns, str(p)))
        for path in order:
            target = final / path.relative_to(tmp)
            if target.is_dir():
                raise UserError(
                    f"output {final} holds a folder {target.name} where the step writes a file: "
                    "remove it or give another --out"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    return value, final


def checkpoint_folder(out: str | os.PathLike) -> Path:
    """Where allocate checkpoints for the output ``out``: ``<out>.checkpoint`` next to a
    local output, a folder in the cache named after an ``s3://`` one. Stable, so a rerun
    with ``--resume`` finds it."""
    if is_remote(out):
        return cache_root() / ".checkpoints" / sha256_text(str(out).rstrip("/"))[:24]
    final = Path(out).expanduser()
    return final.parent / f"{final.name}.checkpoint"
