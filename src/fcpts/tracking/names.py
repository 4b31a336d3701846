"""The names fcpts gives things in MLflow: params, metrics, run tags, version tags, aliases.

Kept in one place (and free of heavy imports) so the tracking and registry modules, the
CLI and the tests agree on them.
"""

from __future__ import annotations

import re
from typing import Any

NA = "n/a"
DEFAULT_EXPERIMENT = "fcpts"
PIPELINE_RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# ---- run params: the same names on every run (n/a where they do not apply); besides
# these, every declared setting of every method by its outside name (see param_names)
RUN_PARAM_NAMES = (
    "target",
    "allocator",
    "score",
    "structure",
    "budget",
    "blockwise",
    "seed",
    "calibration_samples",
    "model_source",
    "model_digest",
    "prunable",
)
# from the evaluate step (fcpts.tracking.outputs says where in metrics.json each is)
EVALUATION_PARAM_NAMES = (
    "metric",
    "evaluation_samples",
    "evaluation_seed",
    "eval_batch_size",
    "latency_threads",
    "latency_batch_size",
    "latency_runs",
    "latency_device",
)

# ---- run metrics
METRIC_DENSE = "evaluate/dense"
METRIC_SPARSE = "evaluate/sparse"
METRIC_DELTA = "evaluate/delta"
METRIC_ACHIEVED = "allocate/achieved_sparsity"
METRIC_ZEROS = "allocate/zeros"
CURVE_PREFIX = "allocate"  # allocate/loss, allocate/global_sparsity, ... per iteration
STEP_SECONDS = "{step}/seconds"

# ---- run artifacts at the root, the same paths on every run (the compare view shows them)
CHART_ARTIFACT = "allocation.png"
LAYERS_TABLE = "layers.json"

# ---- run tags
TAG_COMMAND = "fcpts.command"  # the fcpts run command that reproduces the run
TAG_EXACT = "fcpts.exact"  # true: exactly round(target x prunable) zeros
TAG_COUNTS_MATCH = "fcpts.counts_match_manifest"
TAG_SAME_DATA = "fcpts.same_data_as_calibration"
TAG_EVALUATION_OVERLAP = "fcpts.evaluation_overlap"  # samples shared with calibration
TAG_PIPELINE_RUN_ID = "fcpts.pipeline_run_id"
TAG_VERSION = "fcpts.version"
TAG_GIT_COMMIT = "fcpts.git_commit"
TAG_GIT_DIRTY = "fcpts.git_dirty"
TAG_MODEL_URI = "fcpts.model_uri"
TAG_MODEL_ID = "fcpts.model_id"
TAG_FAILED_STEP = "fcpts.failed_step"
TAG_STEP = "fcpts.step."  # + step name: running, done, failed
TAG_BACKFILLED = "fcpts.backfilled."  # + step name: logged later by fcpts register --from
TAG_DIGEST = "fcpts.{context}_digest"  # fcpts.calibration_digest, fcpts.evaluation_digest
TAG_GATE = "fcpts.gate"  # approved, rejected
TAG_GATE_REASONS = "fcpts.gate_reasons"
TAG_REGISTERED_MODEL = "fcpts.registered_model"
TAG_MODEL_VERSION = "fcpts.model_version"
TAG_DECISION = "fcpts.decision"
TAG_HIGHER_IS_BETTER = "fcpts.higher_is_better"  # from metrics.json; the registry reads it

# ---- registry: aliases, version tags, registered model tags
ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
V_TARGET = "target"
V_ACHIEVED = "achieved_sparsity"
V_METRIC = "metric"
V_VALUE = "metric_value"
V_DENSE = "dense_metric_value"
V_GREATER_IS_BETTER = "greater_is_better"
V_ALLOCATOR = "allocator"
V_SOURCE_RUN = "source_run_id"
V_EVAL_DIGEST = "evaluation_digest"
V_MODEL_DIGEST = "model_digest"  # the dense source model's, from the run's param
V_MODEL_SOURCE = "model_source"
V_PRUNABLE = "prunable"  # how many weights the layer selection made prunable
V_FCPTS_VERSION = "fcpts_version"
V_DECISION = "decision"  # champion, challenger, former champion, rolled back
V_REASON = "decision_reason"
M_CHAMPION_HISTORY = "fcpts.champion_history"  # JSON list of versions, oldest first
LOCK_SUFFIX = ".fcpts-lock"

# ---- MLflow error codes fcpts handles
ERR_EXISTS = "RESOURCE_ALREADY_EXISTS"
ERR_MISSING = "RESOURCE_DOES_NOT_EXIST"


def param_names() -> tuple[str, ...]:
    """Every param a pipeline run logs: :data:`RUN_PARAM_NAMES`, then each declared method
    setting by its flag's name (:mod:`fcpts.alloc.declared`), the same set on every run."""
    from ..alloc.declared import method_settings

    return RUN_PARAM_NAMES + tuple(s.dest for _, s in method_settings())


def model_base(source: str) -> str:
    """A source model's short name for registered models and run names: ``demo:minilm``
    -> ``minilm``, ``s3://b/models/bert/`` -> ``bert``, ``pkg.nets:resnet18`` ->
    ``resnet18``; characters other than letters, digits, ``-_.`` become ``-``."""
    base = str(source).removeprefix("demo:").rstrip("/").split("/")[-1].split(":")[-1]
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in base) or "model"


def default_model_name(source: str, method: str | None) -> str:
    """The registered model a run goes to by default: ``<model>-<method>`` (``minilm-fcpts``),
    one per source model and method, so every target's version competes for its champion
    (the rule: :func:`fcpts.tracking.decision.decide`)."""
    return f"{model_base(source)}-{method or 'sparse'}"


def run_name(source: str | None, method: str | None, target: Any, step: str, pid: str) -> str:
    """The MLflow run's name: model, method and target, then the pipeline run id's random
    tail, e.g. ``minilm-fcpts-0.5-a989b687``. Before the target is known (a run that
    ``fcpts calibrate`` opened) the step stands in for method and target:
    ``minilm-calibrate-a989b687``, renamed by allocate."""
    parts = [model_base(source) if source else "fcpts"]
    try:
        parts += [str(method or "sparse"), f"{float(target):g}"]
    except (TypeError, ValueError):
        parts.append(step)
    parts.append(str(pid).rsplit("-", 1)[-1][:8])
    return "-".join(parts)
