"""The ``fcpts run`` command that reproduces a result, from the files the steps wrote.

Every flag comes from the declarations (:mod:`fcpts.settings`): the sources, the option
groups, the layer selection and the method's settings, each with the value the manifest,
the metrics or the decision recorded, written only where it differs from the declared
default. What no file records (the device, the latency budget, where outputs go) is left
to the defaults; credentials are removed.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterator, Mapping
from typing import Any

from ..core import LayerSelection
from ..settings import Declared, declared
from ..sources import Sources
from ..tracking.names import default_model_name
from ..tracking.redaction import redact
from . import options as o

PROG = "fcpts run"


def _values(
    manifest: Mapping[str, Any], metrics: Mapping[str, Any], decision: Mapping[str, Any]
) -> Iterator[tuple[Declared, Any]]:
    """(setting, recorded value) for every setting a file records."""
    calibration = manifest.get("calibration") or {}
    evaluation = metrics.get("evaluation") or {}
    recorded: list[tuple[type, Mapping[str, Any]]] = [
        (Sources, manifest.get("sources") or {}),
        (
            o.CalibrationOptions,
            {
                "score": manifest.get("score"),
                "samples": calibration.get("samples"),
                "batch_size": calibration.get("batch_size"),
            },
        ),
        (
            o.AllocationOptions,
            {
                "target": manifest.get("target"),
                "method": manifest.get("method"),
                "blockwise": manifest.get("blockwise"),
                "memory_mb": (manifest.get("blockwise_run") or {}).get("memory_mb"),
            },
        ),
        (LayerSelection, manifest.get("selection") or {}),
        (o.EvaluationOptions, {"samples": evaluation.get("samples")}),
        (o.GateOptions, {"tolerance": decision.get("tolerance")}),
        (o.RunOptions, {"seed": manifest.get("seed")}),
    ]
    source = (manifest.get("sources") or {}).get("model")
    name = decision.get("name")
    if name and name != default_model_name(str(source), manifest.get("method")):
        recorded.append((o.RegistryOptions, {"name": name}))
    for group, values in recorded:
        for setting in declared(group):
            if setting.opt.cli and values.get(setting.name) is not None:
                yield setting, values[setting.name]
    method = manifest.get("method")
    settings = manifest.get("settings") or {}
    from ..alloc.declared import method_settings

    for owner, setting in method_settings():
        if owner == method and settings.get(setting.name) is not None:
            yield setting, settings[setting.name]


def _same(setting: Declared, value: Any) -> bool:
    default = setting.default if setting.has_default else None
    if setting.type is tuple:
        return tuple(value or ()) == tuple(default or ())
    if setting.type is dict:
        return not value and not default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return float(value) == float(default)
    return value == default


def _words(setting: Declared, value: Any) -> list[str]:
    flag = setting.flag
    if setting.type is bool:
        return [flag if value else "--no-" + flag[2:]]
    if setting.type is tuple:
        return [w for item in value for w in (flag, str(item))]
    if setting.type is dict:
        return [
            w
            for key, bound in dict(value).items()
            for w in (flag, f"{key}={':'.join(f'{b:g}' for b in bound)}")
        ]
    return [flag, f"{value:g}" if isinstance(value, float) else str(value)]


def reproduce_command(
    manifest: Mapping[str, Any],
    metrics: Mapping[str, Any] | None = None,
    decision: Mapping[str, Any] | None = None,
) -> str:
    """``fcpts run --model ... --target ...``: the pipeline run that makes this result
    again (same model, data, settings and seed), as one shell-quoted line."""
    words: list[str] = []
    seen: set[str] = set()
    for setting, value in _values(manifest, metrics or {}, decision or {}):
        always = setting.flag in ("--model", "--target", "--method")
        if setting.flag in seen or (_same(setting, value) and not always):
            continue
        seen.add(setting.flag)
        words += _words(setting, value)
    return " ".join([PROG, *(shlex.quote(redact(w)) for w in words)])
