"""Run params and metric keys as MLflow takes them: stable names, strings, no credentials."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from typing import Any

from ..alloc.declared import param_values
from .names import NA, param_names
from .redaction import redact

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


def metric_key(key: str) -> str:
    """key with the characters MLflow refuses in metric names replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", str(key))


def param_value(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or NA
    return redact(value)


def now_ms() -> int:
    return int(time.time() * 1000)


def pipeline_params(
    manifest: Mapping[str, Any],
    *,
    model_source: str | None = None,
    model_digest: str | None = None,
    calibration_samples: int | None = None,
) -> dict[str, str]:
    """The params every fcpts run logs, by their stable names (:func:`param_names`), from an
    allocation manifest (``read_manifest(dir)``). ``model_source``, ``model_digest`` and
    ``calibration_samples`` default to the manifest's ``sources.model``,
    ``dense_model_sha256`` and ``calibration.samples`` (written by ``fcpts allocate``);
    ``prunable`` is the manifest's count of prunable weights (fixed by the model and the
    layer selection: a setting of the run, not a result).
    Whatever is unknown or does not apply to the allocator is ``n/a``. Values are strings,
    credentials removed."""
    settings = manifest.get("settings") or {}
    sources = manifest.get("sources") or {}
    calibration = manifest.get("calibration") or {}
    structured = manifest.get("structure") or {}
    values = {
        "target": manifest.get("target"),
        "allocator": manifest.get("method"),
        "score": manifest.get("score"),
        "structure": structured.get("structure", "unstructured"),
        "budget": structured.get("budget", "params"),
        "blockwise": manifest.get("blockwise"),
        **param_values(manifest.get("method"), settings),
        "seed": settings.get("seed", manifest.get("seed")),
        "calibration_samples": calibration_samples
        if calibration_samples is not None
        else calibration.get("samples"),
        "model_source": model_source or sources.get("model"),
        "model_digest": model_digest or manifest.get("dense_model_sha256"),
        "prunable": manifest.get("prunable"),
    }
    return {k: param_value(values[k]) for k in param_names()}


def numbers(data: Mapping[str, Any], prefix: str, depth: int = 2) -> dict[str, float]:
    """The finite numbers (booleans as 1/0) of a JSON-like dict, nested keys joined by '.'."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = 1.0 if value else 0.0
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1:
            out.update(numbers(value, f"{name}.", depth - 1))
    return out
