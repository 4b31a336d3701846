"""MLflow tracking and model registry for fcpts pipelines.

* :mod:`fcpts.tracking.tracking`: :class:`PipelineRun`, one MLflow run per pipeline run
  (params, metrics, curves, artifacts, datasets, the sparse model); the module docstring
  explains the layout.
* :mod:`fcpts.tracking.registry`: :func:`register`, :func:`promote`, :func:`rollback`,
  :func:`champion`, :func:`load_model` (aliases ``champion``/``challenger``, version tags).
* :mod:`fcpts.tracking.connection`: where the store is (:func:`resolve_tracking_uri`,
  embedded ``sqlite:///./mlruns/mlflow.db`` by default), retries, :func:`redact`.

Names are imported on first use, so ``import fcpts.tracking`` costs nothing until one is
touched (MLflow and torch take seconds to import).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# Before mlflow is imported through this package: one retry policy, fcpts's own (see
# fcpts.tracking.connection), no usage telemetry sent anywhere, and MLflow's warnings but
# not its INFO chatter (a CLI error stays one line on stderr). An explicit setting in the
# environment wins.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

_EXPORTS = {
    "PipelineRun": "tracking",
    "CurveLogger": "tracking",
    "pipeline_params": "tracking",
    "model_digest": "tracking",
    "batches_digest": "tracking",
    "new_pipeline_run_id": "tracking",
    "git_commit": "tracking",
    "register": "registry",
    "promote": "registry",
    "rollback": "registry",
    "champion": "registry",
    "load_model": "registry",
    "registry_hook": "registry",
    "register_request": "registry",
    "decide": "registry",
    "Registration": "registry",
    "ChampionChange": "registry",
    "RegistryLock": "registry",
    "Store": "connection",
    "RetryPolicy": "connection",
    "redact": "connection",
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
