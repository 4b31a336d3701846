"""The names fcpts gives things in MLflow: params, metrics, run tags, version tags, aliases.

Kept in one place (and free of heavy imports) so the tracking and registry modules, the
CLI and the tests agree on them.
"""

from __future__ import annotations

import re

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
    "seed",
    "calibration_samples",
    "model_source",
    "model_digest",
)
EVALUATION_PARAM_NAMES = ("metric", "evaluation_samples")

# ---- run metrics
METRIC_DENSE = "evaluate/dense"
METRIC_SPARSE = "evaluate/sparse"
METRIC_DELTA = "evaluate/delta"
METRIC_ACHIEVED = "allocate/achieved_sparsity"
METRIC_EXACT = "allocate/exact"
CURVE_PREFIX = "allocate"  # allocate/loss, allocate/global_sparsity, ... per iteration
STEP_SECONDS = "{step}/seconds"

# ---- run tags
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
