"""The sparsify pipeline's arguments from ``fcpts run`` options: written once, used by
``fcpts run`` (the KFP local runner) and ``fcpts submit`` (a KFP cluster)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from .common import DEFAULT_TOLERANCE, RUN_DEFAULT_TARGET, _get, selection_overrides

DEFAULT_MODEL = "demo:minilm"
DEFAULT_EXPERIMENT = "fcpts"


def pipeline_arguments(
    args: argparse.Namespace, settings: Mapping[str, Any], tracking: Any = None
) -> dict[str, Any]:
    """Every parameter of the sparsify pipeline (pipelines/sparsify.py) from the options of
    ``fcpts run``, the allocator ``settings`` built from them, and the run's tracking (a
    :class:`~fcpts.steps.tracked.Tracking`, or None: no tracking)."""
    selection = selection_overrides(args)
    return {
        "model": args.model or DEFAULT_MODEL,
        "data": args.data or "",
        "weights": args.weights or "",
        "task": _get(args, "task", "auto"),
        "target": float(RUN_DEFAULT_TARGET if args.target is None else args.target),
        "method": _get(args, "method", "fcpts"),
        "score": _get(args, "score", "auto"),
        "settings": json.dumps(dict(settings)),
        "selection": json.dumps(selection) if selection else "",
        "calibration_samples": args.calibration_samples or 0,
        "batch_size": args.batch_size or 0,
        "evaluation_samples": args.evaluation_samples or 0,
        "eval_batch_size": args.eval_batch_size or 0,
        "seed": _get(args, "seed", 0),
        "recalibrate_bn": bool(args.recalibrate_bn),
        "tolerance": float(_get(args, "tolerance", DEFAULT_TOLERANCE)),
        "registry": args.registry or "",
        "name": args.name or "",
        "image_size": args.image_size or 0,
        "image_mode": _get(args, "image_mode", "RGB"),
        "device": _get(args, "device", "auto"),
        "tracking_uri": (tracking.uri or "") if tracking else "",
        "experiment": (tracking.experiment if tracking else None) or DEFAULT_EXPERIMENT,
        "pipeline_run_id": (tracking.pipeline_run_id or "") if tracking else "",
    }
