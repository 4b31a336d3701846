"""Names shared by the sweep modules: output files, study attributes, defaults, and the
small helpers every part uses (log lines, Optuna warnings, the tracking URI)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

FORMAT = "fcpts.sweep/1"
BEST_FILE = "best.json"
ALLOCATE_FILE = "allocate.json"
TRIALS_FILE = "trials.json"
PLOT_FILE = "study.png"
STUDY_DB = "study.db"
DEFAULT_EXPERIMENT = "fcpts-sweep"
CONSTRAINT = "exact_target"
ATTR_CONSTRAINT = "constraint"
ATTR_BASELINE = "baseline"
ATTR_SPEC = "fcpts.spec"
ATTR_DENSE = "fcpts.dense_value"
ATTR_METRIC = "fcpts.metric"
ATTR_SPLITS = "fcpts.splits"
ATTR_PARENT_RUN = "fcpts.mlflow_parent_run_id"
DEFAULT_HEARTBEAT = 15
DEFAULT_GRACE = 60


@contextlib.contextmanager
def quiet_optuna() -> Iterator[None]:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def tracking_uri_of(tracking_uri: str | None) -> str | None:
    """``tracking_uri``, else ``$MLFLOW_TRACKING_URI``; None when neither names one."""
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI")
    uri = str(uri).strip() if uri else ""
    return uri or None


def finite(value: Any) -> Any:
    """``value``, or None for a float that is not finite (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def say(message: str) -> None:
    print(f"[fcpts sweep] {message}", file=sys.stderr, flush=True)
