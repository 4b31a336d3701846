"""Option groups shared by several ``fcpts`` commands, derived from the declarations of
the steps' options (:mod:`fcpts.steps.options`), the sources and the layer selection
(see :mod:`fcpts.cli.derive`); only the CLI's own options are written here."""

from __future__ import annotations

import argparse
from typing import Any

from ..core import LayerSelection
from ..sources import Sources
from ..steps.options import (
    AllocationOptions,
    CalibrationOptions,
    CheckpointOptions,
    EvaluationOptions,
    GateOptions,
    RegistryOptions,
    RunOptions,
    TrackingOptions,
)
from .derive import add_allocator_settings, add_group, methods_help

SELECTION_HELP = (
    "Patterns are shell globs on module names (encoder.layer.*.attention.*) or regexes written "
    "re:<expr>; repeat an option or separate patterns by commas. Each option given replaces "
    "the source's default for that field (demo:minilm and Hugging Face models exclude pooler.*)."
)


def add_output(p: argparse.ArgumentParser, help_text: str) -> None:
    """``--out``: the folder (or ``s3://`` prefix) a command writes."""
    p.add_argument("--out", metavar="DIR", default=None, help=help_text)


def add_common(p: argparse.ArgumentParser) -> None:
    g = add_group(p, RunOptions, "general")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (keys are the long option names, with - or _; "
        "a section named after the command overrides the top level; flags override the file)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        default=None,
        help="no progress bars (they are shown only when stderr is a terminal anyway)",
    )


def add_sources(
    p: argparse.ArgumentParser, model_required: bool = True, model_default: str | None = None
) -> None:
    add_group(
        p,
        Sources,
        "model and data",
        None
        if model_required or model_default
        else "--model and --data are not needed with --calibration.",
        required=("model",) if model_required and not model_default else (),
        shown_defaults={"model": model_default} if model_default else None,
    )


def add_calibration(p: argparse.ArgumentParser) -> None:
    add_group(p, CalibrationOptions, "calibration", aliases={"calibration_samples": ("--samples",)})


def add_selection(p: argparse.ArgumentParser) -> None:
    add_group(p, LayerSelection, "layer selection", SELECTION_HELP)


def add_allocator(p: argparse.ArgumentParser, target_required: bool) -> None:
    g = add_group(
        p,
        AllocationOptions,
        "allocation",
        f"methods: {methods_help()}; fcpts learns the allocation, the others are baselines.",
        required=("target",) if target_required else (),
    )
    add_set(
        g,
        "an allocator setting by its name, e.g. --set schedule=cosine (every setting also "
        "has its own flag, listed under the method's settings below; config file: a 'settings' "
        "mapping or the flag names)",
    )
    add_allocator_settings(p)


def add_set(group: Any, help_text: str) -> None:
    """``--set KEY=VALUE``: a method setting by its own name (repeatable)."""
    group.add_argument(
        "--set",
        dest="settings_flags",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help=help_text,
    )


def add_checkpoints(p: argparse.ArgumentParser) -> None:
    add_group(p, CheckpointOptions, "checkpoints (fcpts method)")


def add_evaluation(p: argparse.ArgumentParser, samples_alias: bool) -> None:
    add_group(
        p,
        EvaluationOptions,
        "evaluation",
        aliases={"evaluation_samples": ("--samples",)} if samples_alias else None,
    )


def add_gate(p: argparse.ArgumentParser, registry: bool, gate_optional: bool = False) -> None:
    add_group(
        p,
        GateOptions,
        "approval gate",
        "Given --tolerance, evaluate also records the gate's decision." if gate_optional else None,
        shown_defaults={"tolerance": "none: no decision"} if gate_optional else None,
    )
    if registry:
        add_group(p, RegistryOptions, "registry")


def add_tracking(p: argparse.ArgumentParser) -> None:
    g = add_group(
        p,
        TrackingOptions,
        "tracking",
        "All steps of one pipeline run log to one MLflow run, found by the pipeline run id; a "
        "step given no id continues the run recorded in its input folder.",
    )
    g.add_argument(
        "--no-tracking",
        dest="tracking",
        action="store_false",
        default=None,
        help="log nothing to MLflow (and register nowhere unless --registry is given)",
    )
