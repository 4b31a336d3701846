"""Reading the files sources name: local paths for S3 URIs, tensors that are never
unpickled (safetensors, or ``torch.load(weights_only=True)``), and the functions that
``module:function`` sources name."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
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


def import_callable(module: str, function: str, what: str, unknown: str) -> Any:
    """The callable ``function`` (dotted attributes allowed) of ``module``: an importable
    module name or a ``file.py`` path. UserErrors say ``what`` the file is ("model
    builder") and start a module that cannot be imported with ``unknown``."""
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise UserError(f"{what} file {module} does not exist")
        name = f"_fcpts_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot import {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"importing {module} failed: {first_line(exc)}") from None
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise UserError(
                f"{unknown}: module {module!r} cannot be imported ({exc.msg}); "
                "is it installed or on PYTHONPATH?"
            ) from None
        except Exception as exc:
            raise UserError(f"importing {module} failed: {first_line(exc)}") from None
    target: Any = mod
    for part in function.split("."):
        if not hasattr(target, part):
            raise UserError(f"module {module} has no {function!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{module}:{function} is not callable")
    return target
