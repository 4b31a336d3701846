"""MLflow for a sweep: one parent run per study (reopened on resume), one nested run per
finished trial, the best trial's settings tagged on the parent at the end."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..tracking.names import model_base
from .common import ATTR_BASELINE, ATTR_PARENT_RUN, DEFAULT_EXPERIMENT
from .objective import constraint_of, is_feasible
from .space import SweepSpec
from .storage import first_line, redact_url


class Tracker:
    """MLflow for one sweep process: the parent run and one nested run per trial."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        from ..tracking.connection import Store

        self.store = Store(tracking_uri)
        self.client = self.store.client
        self.experiment = experiment

    def experiment_id(self) -> str:
        return self.store.experiment_id(self.experiment)

    def parent_run(self, study: Any, spec: SweepSpec, storage: str, created: bool) -> str:
        """The study's parent run: reopened when the study names one in this store, else
        created (and recorded in the study)."""
        from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

        run_id = study.user_attrs.get(ATTR_PARENT_RUN)
        if run_id is None and not created and not study.get_trials(deepcopy=False):
            # another process created the study a moment ago and may be creating the run
            for _ in range(10):
                time.sleep(0.5)
                run_id = _fresh_study_attr(study, ATTR_PARENT_RUN)
                if run_id:
                    break
        if run_id:
            try:
                run = self.client.get_run(run_id)
            except Exception:
                run = None
            if run is not None and run.info.lifecycle_stage == "active":
                self.store.call("reopen the sweep run", self.client.update_run, run_id, "RUNNING")
                return run_id
        exp = self.experiment_id()
        name = f"{model_base(spec.sources.model)}-{spec.target:g}-sweep-{study.study_name}"
        tags = {
            MLFLOW_RUN_NAME: name,
            "fcpts.sweep.study": study.study_name,
            "fcpts.sweep.storage": redact_url(storage),
        }
        run = self.store.call(
            "create the sweep run",
            self.client.create_run,
            exp,
            tags=tags,
            run_name=name,
        )
        run_id = run.info.run_id
        params = {
            "model": spec.sources.model,
            "data": spec.sources.data or "",
            "target": spec.target,
            "seed": spec.seed,
            "study": study.study_name,
            "storage": redact_url(storage),
            "report_every": spec.report_every,
            "settings": json.dumps(spec.settings, sort_keys=True),
        }
        params.update({f"space.{k}": ":".join(map(str, v)) for k, v in spec.space.items()})
        from mlflow.entities import Param

        self.store.call(
            "log the sweep params",
            self.client.log_batch,
            run_id,
            params=[Param(k, str(v)[:6000]) for k, v in params.items()],
        )
        study.set_user_attr(ATTR_PARENT_RUN, run_id)
        return run_id

    def trial_callback(self, parent_run_id: str) -> Callable[[Any, Any], None]:
        """Nested runs go to the parent's experiment."""
        parent = self.store.call("look up the sweep run", self.client.get_run, parent_run_id)
        return TrialLogger(self, parent.info.experiment_id, parent_run_id)

    def finish(self, run_id: str, best: Mapping[str, Any], files: Sequence[Path], ok: bool) -> None:
        from mlflow.entities import Metric

        tags = {"fcpts.sweep.trials": str(best.get("trials", {}).get("total"))}
        if best.get("trial") is not None:
            tags["best.trial"] = str(best["trial"])
            tags["best.value"] = repr(best["value"])
            tags["best.score"] = str(best["score"])
            for k, v in (best.get("params") or {}).items():
                tags[f"best.{k}"] = repr(v) if isinstance(v, float) else str(v)
        now = int(time.time() * 1000)
        step = int(best.get("trials", {}).get("total") or 0)
        metrics = []
        for key in ("value", "dense_value"):
            if isinstance(best.get(key), (int, float)):
                metrics.append(
                    Metric(f"best_{key}" if key == "value" else key, best[key], now, step)
                )
        base = (best.get("baseline") or {}).get("value")
        if isinstance(base, (int, float)):
            metrics.append(Metric("baseline_value", base, now, step))
        for state, n in (best.get("trials") or {}).items():
            if state != "total":
                metrics.append(Metric(f"trials_{state}", n, now, step))
        from mlflow.entities import RunTag

        self.store.call(
            "tag the sweep run",
            self.client.log_batch,
            run_id,
            metrics=metrics,
            tags=[RunTag(k, v[:5000]) for k, v in tags.items()],
        )
        for path in files:
            if Path(path).is_file():
                self.store.call("log a sweep artifact", self.client.log_artifact, run_id, str(path))
        self.store.call(
            "close the sweep run",
            self.client.set_terminated,
            run_id,
            "FINISHED" if ok else "FAILED",
        )


def _fresh_study_attr(study: Any, key: str) -> Any:
    import optuna

    fresh = optuna.load_study(study_name=study.study_name, storage=study._storage)
    return fresh.user_attrs.get(key)


class TrialLogger:
    """Optuna callback: one nested MLflow run per trial that finished in this process."""

    _STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

    def __init__(self, tracker: Tracker, experiment_id: str, parent_run_id: str) -> None:
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.parent = parent_run_id

    def __call__(self, study: Any, trial: Any) -> None:
        try:
            self._log(study, trial)
        except Exception as exc:  # never lose a sweep to a tracking hiccup
            print(
                f"[fcpts sweep] warning: trial {trial.number} was not logged to MLflow: "
                f"{first_line(exc)}",
                file=sys.stderr,
            )

    def _log(self, study: Any, trial: Any) -> None:
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        client, call = self.tracker.client, self.tracker.store.call
        start = int(trial.datetime_start.timestamp() * 1000) if trial.datetime_start else None
        end = (
            int(trial.datetime_complete.timestamp() * 1000)
            if trial.datetime_complete
            else int(time.time() * 1000)
        )
        state = trial.state.name
        name = f"trial-{trial.number}"
        tags = {
            MLFLOW_PARENT_RUN_ID: self.parent,
            MLFLOW_RUN_NAME: name,
            "optuna.study": study.study_name,
            "optuna.trial_number": str(trial.number),
            "optuna.state": state,
            "fcpts.sweep.baseline": str(bool(trial.user_attrs.get(ATTR_BASELINE))).lower(),
            "fcpts.sweep.feasible": str(is_feasible(trial)).lower(),
        }
        run = call(
            f"create the run of trial {trial.number}",
            client.create_run,
            self.experiment_id,
            start_time=start,
            tags=tags,
            run_name=name,
        )
        run_id = run.info.run_id
        params = [
            Param(k, repr(v) if isinstance(v, float) else str(v)) for k, v in trial.params.items()
        ]
        metrics = [
            Metric("rec_loss", -v, end, int(step))
            for step, v in sorted(trial.intermediate_values.items())
            if math.isfinite(v)
        ]
        if state == "COMPLETE" and trial.value is not None and math.isfinite(trial.value):
            metrics.append(Metric("value", trial.value, end, 0))
        for key in ("achieved_sparsity", "seconds", "learned_sparsity"):
            v = trial.user_attrs.get(key)
            if isinstance(v, (int, float)) and math.isfinite(v):
                metrics.append(Metric(key, v, end, 0))
        con = constraint_of(trial)
        if con:
            metrics.append(Metric("constraint", max(con), end, 0))
        call(
            f"log trial {trial.number}",
            client.log_batch,
            run_id,
            metrics=metrics,
            params=params,
            tags=[RunTag("optuna.value", repr(trial.value))] if trial.value is not None else [],
        )
        call(
            f"close the run of trial {trial.number}",
            client.set_terminated,
            run_id,
            self._STATUS.get(state, "FAILED"),
            end,
        )
