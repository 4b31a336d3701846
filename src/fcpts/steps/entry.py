"""What the KFP components run: a component's flat inputs turned into one step call.

``components/build.py`` generates each component's function from the declared options
(:mod:`fcpts.steps.options`, :class:`~fcpts.sources.Sources`); the function's body is
``return run("<step>", dict(locals()))``. Here the inputs are grouped back into the step's
keyword arguments by the same declarations (:func:`~fcpts.steps.options.from_kfp`: an empty
string or a zero means "not given"), the step runs, and the output artifacts get their
metadata. Artifacts are duck-typed (``.path``, ``.metadata``, ``log_metric``): no KFP
import here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any

from ..errors import UserError
from ..sources import Sources
from .options import (
    AllocationOptions,
    CalibrationOptions,
    EvaluationOptions,
    GateOptions,
    PipelineOptions,
    RegistryOptions,
    RunOptions,
    TrackingOptions,
    from_kfp,
)

COMPONENT_STEPS = ("calibrate", "allocate", "evaluate", "register")
# set on the allocate task by a pipeline compiled with --checkpoint-pvc: the PVC's mount
CHECKPOINT_ROOT_ENV = "FCPTS_CHECKPOINT_ROOT"
NO_TRACKING = "none"


def run(step: str, inputs: Mapping[str, Any]) -> Any:
    """Run the component of ``step`` on its inputs; returns what the component returns."""
    started = time.time()
    if step == "calibrate":
        return _calibrate(inputs, started)
    if step == "allocate":
        return _allocate(inputs, started)
    if step == "evaluate":
        return _evaluate(inputs, started)
    if step == "register":
        return _register(inputs, started)
    raise ValueError(f"no component for step {step!r}: one of {', '.join(COMPONENT_STEPS)}")


def sources(inputs: Mapping[str, Any]) -> Sources:
    return Sources(**from_kfp(Sources, inputs))


def tracking_uri(value: str | None) -> str:
    """A component's ``tracking_uri`` parameter as the store to track to ("": none): an
    empty one is ``$MLFLOW_TRACKING_URI`` (on a cluster from the fcpts-mlflow secret), if
    set; ``none`` turns tracking off."""
    text = str(value or "").strip()
    if text.lower() == NO_TRACKING:
        return ""
    return text or os.environ.get("MLFLOW_TRACKING_URI", "").strip()


def tracking(inputs: Mapping[str, Any]):
    """The step's Tracking (:func:`tracking_uri`; None: off); an empty
    ``pipeline_run_id`` falls back to ``kfp_run_id``, the KFP run's id."""
    from .tracked import Tracking

    given = from_kfp(TrackingOptions, inputs)
    return Tracking.from_component(
        tracking_uri(given["tracking_uri"]),
        given["experiment"] or "",
        given["pipeline_run_id"] or "",
        str(inputs.get("kfp_run_id") or ""),
    )


def selection(inputs: Mapping[str, Any]) -> dict[str, Any] | None:
    text = str(from_kfp(PipelineOptions, inputs)["selection"] or "").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"the layer selection is not valid JSON ({exc})") from None


def _calibrate(inputs: Mapping[str, Any], started: float) -> None:
    from . import calibrate

    artifact = inputs["calibration"]
    result = calibrate(
        sources(inputs),
        artifact.path,
        **from_kfp(CalibrationOptions, inputs),
        **from_kfp(RunOptions, inputs),
        selection=selection(inputs),
        tracking=tracking(inputs),
    )
    info = result.info
    artifact.metadata.update(
        {
            "samples": info["samples"],
            "batches": info["batches"],
            "task": info["task"],
            "score": info["score"],
            "model_sha256": info["model"]["sha256"],
            "step_seconds": info["step_seconds"],
            "wall_seconds": round(time.time() - started, 3),
        }
    )


def checkpoint_dir(inputs: Mapping[str, Any]) -> str | None:
    """Where allocate checkpoints in a KFP step: a folder per KFP run under
    ``$FCPTS_CHECKPOINT_ROOT`` (the mounted --checkpoint-pvc, which outlives the pod, so a
    retry in a new pod resumes); without it None (next to the output, in the pod)."""
    root = os.environ.get(CHECKPOINT_ROOT_ENV, "").strip()
    if not root:
        return None
    if not os.access(root, os.W_OK):
        raise UserError(
            f"the checkpoint volume at {root} (--checkpoint-pvc) is not writable by uid "
            f"{os.getuid()}: give the PVC a storage class that lets the pod's user write, or "
            "compile without --checkpoint-pvc"
        )
    run_id = re.sub(r"[^\w.-]", "_", str(inputs.get("kfp_run_id") or "").strip()) or "run"
    return os.path.join(root, run_id)


def _allocate(inputs: Mapping[str, Any], started: float) -> None:
    from . import allocate, settings_from_json

    artifact = inputs["sparse_model"]
    options = from_kfp(PipelineOptions, inputs)
    run_options = from_kfp(RunOptions, inputs)
    result = allocate(
        inputs["calibration"].path,
        artifact.path,
        **from_kfp(AllocationOptions, inputs),
        score=from_kfp(CalibrationOptions, inputs)["score"],
        settings=settings_from_json(options["settings"]),
        selection=selection(inputs),
        seed=run_options["seed"],
        device=run_options["device"],
        log_every=options["log_every"],
        checkpoint_dir=checkpoint_dir(inputs),
        resume=True,  # a retry that sees the same disk continues (see components/README)
        tracking=tracking(inputs),
    )
    m = result.manifest
    artifact.metadata.update(
        {
            **{k: m[k] for k in ("target", "achieved_sparsity", "zeros", "prunable", "method")},
            **{k: m[k] for k in ("score", "model_sha256", "step_seconds")},
            "wall_seconds": round(time.time() - started, 3),
        }
    )


def _evaluate(inputs: Mapping[str, Any], started: float) -> bool:
    from . import evaluate

    out = inputs["evaluation"]
    result = evaluate(
        sources(inputs),
        inputs["sparse_model"].path,
        out.path,
        **from_kfp(EvaluationOptions, inputs),
        **from_kfp(GateOptions, inputs),
        **from_kfp(RunOptions, inputs),
        recalibrate_bn=from_kfp(AllocationOptions, inputs)["recalibrate_bn"],
        tracking=tracking(inputs),
    )
    files = result.files
    for name, key in (("metrics", "metrics"), ("report", "markdown"), ("report_html", "html")):
        shutil.copyfile(files[key], inputs[name].path)
    m = result.metrics
    metrics = inputs["metrics"]
    metrics.log_metric(f"dense_{m['metric']}", m["dense"])
    metrics.log_metric(f"sparse_{m['metric']}", m["sparse"])
    metrics.log_metric("quality_drop", m["drop"])
    metrics.log_metric("achieved_sparsity", m["achieved_sparsity"])
    metrics.log_metric("size_ratio", m["size"]["ratio"])
    metrics.log_metric("dense_latency_ms", m["latency"]["dense_ms"])
    metrics.log_metric("sparse_latency_ms", m["latency"]["sparse_ms"])
    out.metadata.update(
        {
            "approved": m["gate"]["approved"],
            "step_seconds": m["step_seconds"],
            "wall_seconds": round(time.time() - started, 3),
        }
    )
    return bool(m["gate"]["approved"])


def _register(inputs: Mapping[str, Any], started: float) -> None:
    from . import register

    decision = inputs["decision"]
    result = register(
        inputs["metrics"].path,
        inputs["sparse_model"].path,
        decision.path,
        **from_kfp(GateOptions, inputs),
        **from_kfp(RegistryOptions, inputs),
        tracking=tracking(inputs),
    )
    decision.metadata.update(
        {
            "approved": result.decision.approved,
            "registration": str((result.record.get("registration") or {}).get("status")),
            "wall_seconds": round(time.time() - started, 3),
        }
    )
