"""MLflow tracking and model registry for fcpts pipelines.

* :mod:`fcpts.tracking.tracking`: :class:`PipelineRun`, one MLflow run per pipeline run
  (params, metrics, curves, artifacts, datasets, the sparse model); the module docstring
  explains the layout.
* :mod:`fcpts.tracking.registry`: :func:`register`, :func:`promote`, :func:`rollback`,
  :func:`champion`, :func:`load_model` (aliases ``champion``/``challenger``, version tags).
* :mod:`fcpts.tracking.connection`: where the store is (:func:`resolve_tracking_uri`,
  embedded ``sqlite:///./mlruns/mlflow.db`` by default), :class:`Store`.
* :mod:`fcpts.tracking.retry`: how calls are retried; :mod:`fcpts.tracking.redaction`:
  :func:`redact`, credentials out of URIs; :mod:`fcpts.tracking.firstuse`: a new SQLite
  database opened by several processes at once.

Names are imported on first use, so ``import fcpts.tracking`` costs nothing until one is
touched (MLflow and torch take seconds to import).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

from .retry import HTTP_DEFAULTS

# Before mlflow is imported through this package: MLflow's HTTP retries spanning about a
# minute (see fcpts.tracking.retry), no usage telemetry sent anywhere, and MLflow's warnings
# but not its INFO chatter (a CLI error stays one line on stderr). An explicit setting in
# the environment wins.
DEFAULTS = {
    **HTTP_DEFAULTS,
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_LOGGING_LEVEL": "WARNING",
}
os.environ.update({k: v for k, v in DEFAULTS.items() if k not in os.environ})

_EXPORTS = {
    "PipelineRun": "tracking",
    "CurveLogger": "curves",
    "pipeline_params": "params",
    "model_digest": "provenance",
    "batches_digest": "datasets",
    "new_pipeline_run_id": "provenance",
    "git_commit": "provenance",
    "register": "registry",
    "promote": "registry",
    "rollback": "registry",
    "champion": "registry",
    "load_model": "registry",
    "registry_hook": "registry",
    "register_request": "registry",
    "decide": "decision",
    "Registration": "decision",
    "ChampionChange": "decision",
    "RegistryLock": "lock",
    "Store": "connection",
    "RetryPolicy": "retry",
    "redact": "redaction",
    "split_credentials": "redaction",
    "resolve_tracking_uri": "connection",
    "default_tracking_uri": "connection",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
