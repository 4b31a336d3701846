"""What a step's output becomes in MLflow: metrics for what was measured, params and tags
for what is a constant of the run.

A metric is something a run measured that another run of other settings could measure
differently and a chart should plot: quality, sparsity, size, latency, seconds, curves.
A setting (a seed, a batch size, the thread count, the number of prunable weights the
model and layer selection fix) is a param, the same names on every run; a check's verdict
(exact, the counts agree, the data overlap) is a tag. The numbers of ``metrics.json``,
classified (``evaluate/`` + the key):

======================================  ============================================
``dense``, ``sparse``, ``delta``,        metrics (``delta`` = sparse - dense; ``drop``
``drop``, secondary metrics              is the loss, positive whichever way is better)
``size.dense_bytes``, ``sparse_bytes``,  metrics
``ratio``
``latency.dense_ms``, ``sparse_ms``,     metrics (``speedup`` = dense / sparse: below 1
``speedup``                              the sparse model is slower)
``prunable``                             param ``prunable`` (allocate logs it)
``evaluation.seed``, ``batch_size``      params ``evaluation_seed``, ``eval_batch_size``
``evaluation.samples``,                  params ``evaluation_samples``,
``calibration_samples``                  ``calibration_samples`` (calibrate logs it)
``latency.threads``, ``batch_size``,     params ``latency_threads``,
``runs``, ``device``                     ``latency_batch_size``, ``latency_runs``,
                                         ``latency_device``
``exact``, ``counts_match_manifest``,    tags ``fcpts.exact``, ``fcpts.counts_match_manifest``,
``evaluation.same_data_as_calibration``, ``fcpts.same_data_as_calibration``,
``evaluation.overlap_with_calibration``  ``fcpts.evaluation_overlap``
``zeros``, ``manifest_zeros``,           not logged again: ``allocate/zeros`` and
``achieved_sparsity``                    ``allocate/achieved_sparsity`` say them, the tag
                                         ``fcpts.counts_match_manifest`` that they agree
======================================  ============================================

Any other number ``metrics.json`` gains later is logged as a metric ``evaluate/<key>``,
so nothing is dropped silently. The allocate step: metrics ``allocate/achieved_sparsity``
and ``allocate/zeros``, the tag ``fcpts.exact`` (``prunable`` is a param), the per-layer
table as the MLflow table ``layers.json`` and the chart at ``allocation.png``, both at the
artifact root, the same paths on every run: MLflow's compare view shows the artifacts
that the compared runs share at their root, side by side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .names import (
    METRIC_ACHIEVED,
    METRIC_DELTA,
    METRIC_DENSE,
    METRIC_SPARSE,
    METRIC_ZEROS,
    TAG_COUNTS_MATCH,
    TAG_EVALUATION_OVERLAP,
    TAG_EXACT,
    TAG_SAME_DATA,
)
from .params import numbers

# param name -> where metrics.json holds it (EVALUATION_PARAM_NAMES lists them)
EVALUATION_PARAMS = {
    "evaluation_samples": ("evaluation", "samples"),
    "evaluation_seed": ("evaluation", "seed"),
    "eval_batch_size": ("evaluation", "batch_size"),
    "latency_threads": ("latency", "threads"),
    "latency_batch_size": ("latency", "batch_size"),
    "latency_runs": ("latency", "runs"),
    "latency_device": ("latency", "device"),
}
EVALUATION_TAGS = {
    TAG_EXACT: ("exact",),
    TAG_COUNTS_MATCH: ("counts_match_manifest",),
    TAG_SAME_DATA: ("evaluation", "same_data_as_calibration"),
    TAG_EVALUATION_OVERLAP: ("evaluation", "overlap_with_calibration"),
}
# metrics.json keys that are no metric (text, settings, lists, or logged by another step)
NOT_METRICS = frozenset(
    {
        "metric",
        "dense",
        "sparse",
        "secondary",
        "higher_is_better",
        "target",
        "achieved_sparsity",
        "zeros",
        "manifest_zeros",
        "prunable",
        "exact",
        "counts_match_manifest",
        "evaluation",
        "layers",
        "gate",
        "step_seconds",
        "fcpts_version",
        "format",
        "tracking",
    }
)
LATENCY_SETTINGS = frozenset({"threads", "batch_size", "runs", "device", "kernels"})


def _at(data: Mapping[str, Any], path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _tag(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def read_metrics(metrics: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """The evaluate step's metrics: the dict itself or the ``metrics.json`` at a path,
    with at least ``metric``, ``dense`` and ``sparse``."""
    if isinstance(metrics, Mapping):
        data = dict(metrics)
    else:
        try:
            data = json.loads(Path(metrics).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"cannot read the evaluation metrics {metrics}: {exc}") from None
    missing = [k for k in ("metric", "dense", "sparse") if k not in data]
    if missing:
        raise UserError(
            f"the evaluation metrics have no {', '.join(missing)}: rerun `fcpts evaluate`"
        )
    return data


def evaluation_record(
    data: Mapping[str, Any],
) -> tuple[dict[str, float], dict[str, Any], dict[str, str]]:
    """(metrics, params, tags) for the evaluate step's ``metrics.json`` (see the table)."""
    dense, sparse = float(data["dense"]), float(data["sparse"])
    metrics: dict[str, float] = {
        METRIC_DENSE: dense,
        METRIC_SPARSE: sparse,
        METRIC_DELTA: sparse - dense,
    }
    for name, pair in (data.get("secondary") or {}).items():
        if isinstance(pair, Mapping) and isinstance(pair.get("sparse"), (int, float)):
            metrics[f"evaluate/{name}"] = float(pair["sparse"])
    rest = {k: v for k, v in data.items() if k not in NOT_METRICS}
    latency = rest.get("latency")
    if isinstance(latency, Mapping):
        latency = {k: v for k, v in latency.items() if k not in LATENCY_SETTINGS}
        if latency.get("sparse_ms") and isinstance(latency.get("dense_ms"), (int, float)):
            latency["speedup"] = latency["dense_ms"] / latency["sparse_ms"]
        rest["latency"] = latency
    metrics.update({k: v for k, v in numbers(rest, "evaluate/").items() if k not in metrics})
    params = {name: _at(data, path) for name, path in EVALUATION_PARAMS.items()}
    params["metric"] = data["metric"]
    tags = {
        tag: _tag(value)
        for tag, path in EVALUATION_TAGS.items()
        if (value := _at(data, path)) is not None
    }
    return metrics, params, tags


def allocation_record(manifest: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) for the allocate step's manifest (``prunable`` goes with the
    params: :func:`fcpts.tracking.params.pipeline_params`)."""
    metrics = {
        METRIC_ACHIEVED: float(manifest["achieved_sparsity"]),
        METRIC_ZEROS: float(manifest["zeros"]),
    }
    return metrics, {TAG_EXACT: _tag(bool(manifest.get("exact")))}


def layers_table(layers: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """The per-layer table (one row per prunable layer, in model order) for
    ``MlflowClient.log_table``: name, weights, zeros, sparsity."""
    return {
        "layer": [layer["name"] or "(root)" for layer in layers],
        "weights": [int(layer["numel"]) for layer in layers],
        "zeros": [int(layer["zeros"]) for layer in layers],
        "sparsity": [float(layer["sparsity"]) for layer in layers],
    }
