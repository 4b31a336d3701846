"""The sparsify pipeline's arguments from ``fcpts run`` options: written once, used by
``fcpts run`` (the KFP local runner) and ``fcpts submit`` (a KFP cluster).

The pipeline's parameters are derived from the declared options (pipelines/common.py),
named as the options' flags, so each argument is the option of the same name; the method
settings and the layer selection travel as the JSON ``settings`` and ``selection``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ..steps.entry import NO_TRACKING
from .common import selection_overrides

TRACKING_PARAMETERS = ("tracking_uri", "experiment", "pipeline_run_id")


def pipeline_arguments(
    args: argparse.Namespace,
    settings: Mapping[str, Any],
    tracking: Any = None,
    parameters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Every parameter of the sparsify pipeline, by name, from the options of ``fcpts run``:
    the option's value, else the parameter's default (``parameters``: name -> default, by
    default the sparsify pipeline's); ``settings`` are the allocator settings built from
    the options; ``tracking`` is the run's :class:`~fcpts.steps.tracked.Tracking` (None:
    no tracking, passed as ``tracking_uri`` "none": an empty one would be
    ``$MLFLOW_TRACKING_URI``)."""
    if parameters is None:
        from .pipeline import load_pipeline_module

        inputs = load_pipeline_module().sparsify_pipeline.component_spec.inputs
        parameters = {name: spec.default for name, spec in inputs.items()}
    selection = selection_overrides(args)
    given = {
        "settings": json.dumps(dict(settings)),
        "selection": json.dumps(selection) if selection else "",
        **{
            name: (getattr(tracking, "uri" if name == "tracking_uri" else name) or "")
            if tracking is not None
            else ""
            for name in TRACKING_PARAMETERS
        },
    }
    if tracking is None:
        given["tracking_uri"] = NO_TRACKING
    out = {}
    for name, default in parameters.items():
        value = given[name] if name in given else getattr(args, name, None)
        out[name] = default if value is None or value == "" and default is not None else value
    return out
