"""Shared pieces of the ``fcpts`` command line: defaults, the help formatter, reading
options (``get_option``, ``require_options``, selection and allocator settings) and messages."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UserError
from ..steps.options import AllocationOptions, GateOptions

PROG = "fcpts"
RUN_DEFAULT_TARGET = AllocationOptions.target  # `fcpts run` needs no --target
DEFAULT_TOLERANCE = GateOptions.tolerance
DEFAULT_ROOT = "runs"
DEFAULT_PIPELINE_FILE = "sparsify_pipeline.yaml"
PIPELINE_STEPS = ("calibrate", "allocate", "evaluate", "register")


class Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def get_option(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def require_options(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise UserError(f"--{name.replace('_', '-')} is required for `{PROG} {args.command}`")


def _split_patterns(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [p.strip() for v in values for p in str(v).split(",") if p.strip()]


def selection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The layer-selection fields the user gave (the rest keep the source's defaults)."""
    out: dict[str, Any] = {}
    for key in ("include", "exclude", "keep_dense"):
        patterns = _split_patterns(getattr(args, key, None))
        if patterns is not None:
            out[key] = patterns
    if getattr(args, "bounds", None):
        bounds = {}
        for item in args.bounds:
            pattern, eq, span = str(item).rpartition("=")
            lo, colon, hi = span.partition(":")
            if not eq or not pattern or not colon:
                raise UserError(
                    f"--bounds takes PATTERN=MIN:MAX (e.g. 'classifier.*=0:0.5'), got {item!r}"
                )
            try:
                bounds[pattern] = [float(lo), float(hi)]
            except ValueError:
                raise UserError(f"--bounds {item!r}: MIN and MAX must be numbers") from None
        out["bounds"] = bounds
    for key in ("min_sparsity", "max_sparsity"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def allocator_settings(args: argparse.Namespace, flags: bool = True) -> dict[str, Any]:
    """The chosen method's settings: the config file's ``settings`` mapping, then ``--set``
    items, then (with ``flags``) the settings' own flags (:mod:`fcpts.cli.derive`), each
    overriding the one before."""
    from .derive import given_allocator_settings

    method = get_option(args, "method", "fcpts")
    settings = dict(getattr(args, "settings", None) or {})
    for item in getattr(args, "settings_flags", None) or []:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set takes KEY=VALUE (e.g. --set schedule=cosine), got {item!r}")
        settings[key.strip()] = _parse_value(value.strip())
    if flags:
        settings.update(given_allocator_settings(args, method))
    return settings


def tracking_from_args(args: argparse.Namespace):
    """The steps' :class:`~fcpts.steps.tracked.Tracking` from --tracking-uri, --experiment
    and --pipeline-run-id, or None with --no-tracking."""
    from ..steps.tracked import Tracking

    if getattr(args, "tracking", None) is False:
        return None
    return Tracking(
        uri=getattr(args, "tracking_uri", None) or None,
        experiment=getattr(args, "experiment", None),
        pipeline_run_id=getattr(args, "pipeline_run_id", None) or None,
    )


def sources_from_args(args: argparse.Namespace):
    """:class:`~fcpts.sources.Sources` from the flags (or config keys) of its declared
    fields; those not given keep their defaults."""
    from ..sources import Sources
    from .derive import given

    return Sources(**given(args, Sources))


def progress_from_args(args: argparse.Namespace) -> str:
    """The steps' progress mode: ``off`` with --quiet, else ``auto`` (a bar on a terminal,
    plain lines elsewhere: see :class:`fcpts.steps.progress.Progress`)."""
    return "off" if getattr(args, "quiet", None) else "auto"


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def check_allocation_options(
    target: Any, method: str, settings: Mapping[str, Any], score: str | None
) -> None:
    from ..alloc import get_allocator
    from ..landing import check_target
    from ..scores import check_score

    check_target(target)
    get_allocator(method, **settings)  # unknown method or setting: a UserError naming the choices
    if score not in (None, "auto"):
        check_score(score)


def one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"
