"""MLflow tracking of the pipeline steps: which MLflow run a step logs to and what it logs.

A step tracks when it is given a :class:`Tracking` (the CLI and the KFP components give
one unless tracking is turned off; library calls track nothing by default). All steps of
one pipeline run log to one MLflow run, found by its pipeline run id (see
:mod:`fcpts.tracking.tracking` for the layout and why it is one run).

The pipeline run id travels with the artifacts: calibrate writes a ``tracking`` block
(pipeline run id, experiment, store) into ``calibration.json``, allocate copies it into
``manifest.json`` and evaluate into ``metrics.json``, so a step given no id continues
the run of its input (``fcpts calibrate`` then ``fcpts allocate --calibration`` land in
one MLflow run). An explicit id wins.

Order: each step does its work and writes its output folder first, then logs. Only
allocate reaches for the run before the work (:class:`LiveRun`), so the allocator's loss
and sparsity curves reach MLflow while it runs; that early contact is a single try that
cannot fail the step, and the points are buffered while the store does not answer. After
the work the run is opened with the full retries (about a minute for an MLflow server, see
:mod:`fcpts.tracking.retry`), so a server restart costs nothing. A store that stays down
never costs a result either: the step fails with a ServiceError naming the store, its
output stays on disk, and ``fcpts register --from`` logs and registers it later.

MLflow is imported only when a step actually tracks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..tracking.names import (
    CHART_ARTIFACT,
    DEFAULT_EXPERIMENT,
    PIPELINE_RUN_ID_RE,
    STEP_SECONDS,
    TAG_FAILED_STEP,
    TAG_GATE,
    TAG_GATE_REASONS,
    TAG_STEP,
    run_name,
)

log = logging.getLogger(__name__)

RECORD_KEY = "tracking"  # the block in calibration.json, manifest.json and metrics.json


@dataclass(frozen=True)
class Tracking:
    """Where and under which pipeline run a step logs.

    ``uri``: the tracking store (None: ``$MLFLOW_TRACKING_URI``, else the embedded
    ``sqlite:///./mlruns/mlflow.db``). ``experiment`` and ``pipeline_run_id``: None
    continues the run named by the step's input, else the default experiment and a new
    id (:meth:`resolve`).
    """

    uri: str | None = None
    experiment: str | None = None
    pipeline_run_id: str | None = None
    # (model source, method, target) for the run's name, from the inputs (:meth:`resolve`)
    names: tuple[Any, Any, Any] = field(default=(None, None, None), compare=False)

    def __post_init__(self) -> None:
        if self.experiment is not None and not str(self.experiment).strip():
            raise UserError("--experiment must not be empty: give an MLflow experiment name")
        if self.pipeline_run_id is not None:
            check_pipeline_run_id(self.pipeline_run_id)

    @classmethod
    def from_component(
        cls, tracking_uri: str, experiment: str, pipeline_run_id: str, kfp_run_id: str = ""
    ) -> Tracking | None:
        """The KFP components' parameters: an empty ``tracking_uri`` turns tracking off;
        an empty ``pipeline_run_id`` falls back to the KFP run's id, shared by its tasks."""
        if not str(tracking_uri or "").strip():
            return None
        pid = str(pipeline_run_id or "").strip() or _kfp_id(kfp_run_id)
        return cls(str(tracking_uri).strip(), experiment or None, pid)

    def resolve(self, *inputs: Mapping[str, Any] | None) -> Tracking:
        """This tracking with a pipeline run id and an experiment: its own, else the ones
        recorded in the first input (calibration info, manifest, metrics) that has them,
        else a new id and the default experiment."""
        recorded = next((data[RECORD_KEY] for data in inputs if (data or {}).get(RECORD_KEY)), {})
        pid = self.pipeline_run_id or recorded.get("pipeline_run_id")
        if not pid:
            from ..tracking.provenance import new_pipeline_run_id

            pid = new_pipeline_run_id()
        experiment = self.experiment or recorded.get("experiment") or DEFAULT_EXPERIMENT
        return replace(
            self, pipeline_run_id=str(pid), experiment=str(experiment), names=naming(*inputs)
        )

    def named(self, *inputs: Mapping[str, Any] | None) -> Tracking:
        """This tracking with the run's name taken from ``inputs`` (where they say more)."""
        source, method, target = self.names
        known = {"model": source, "method": method, "target": target}
        return replace(self, names=naming(*inputs, known))

    def record(self) -> dict[str, Any]:
        """The block written into the step's output (credentials removed)."""
        from ..tracking.connection import resolve_tracking_uri
        from ..tracking.redaction import redact

        return {
            "pipeline_run_id": self.pipeline_run_id,
            "experiment": self.experiment,
            "tracking_uri": redact(resolve_tracking_uri(self.uri)),
        }

    def open(self, retry: Any = None, step: str = "run"):
        """The pipeline's :class:`~fcpts.tracking.PipelineRun` (created when missing),
        named from :attr:`names` (:func:`fcpts.tracking.names.run_name`); a run found by
        its id is renamed once its inputs name the target."""
        from ..tracking.tracking import PipelineRun

        source, method, target = self.names
        pid = self.pipeline_run_id
        name = run_name(source, method, target, step, pid) if pid and source else None
        return PipelineRun.open(
            pid,
            tracking_uri=self.uri,
            experiment=self.experiment or DEFAULT_EXPERIMENT,
            run_name=name,
            rename=name is not None and target is not None,
            retry=retry,
        )


def naming(*inputs: Mapping[str, Any] | None) -> tuple[Any, Any, Any]:
    """(model source, method, target) from the first of ``inputs`` (calibration info,
    manifest, metrics) that says each."""
    source = method = target = None
    for data in inputs:
        data = data or {}
        model = data.get("model")
        source = (
            source
            or (data.get("sources") or {}).get("model")
            or (model.get("source") if isinstance(model, Mapping) else model)
        )
        method = method or data.get("method")
        target = data.get("target") if target is None else target
    return source, method, target


def check_pipeline_run_id(pid: str) -> str:
    if not PIPELINE_RUN_ID_RE.match(str(pid)):
        raise UserError(
            f"pipeline run id {pid!r} is not valid: use 1-128 letters, digits, '.', '_' or '-'"
        )
    return str(pid)


def _kfp_id(kfp_run_id: str) -> str | None:
    pid = str(kfp_run_id or "").strip()
    if not pid or pid.startswith("{{"):  # a placeholder nothing resolved
        return None
    return check_pipeline_run_id(pid)


# ------------------------------------------------------------------------------ steps


class LiveRun:
    """A step's MLflow run while the step works, for live curves, unable to fail the step.

    At the start the run is opened with a single try (``quick``; None when the store did not
    answer). ``curves`` is the allocator's ``callback(step, record)``: it buffers the points
    and sends them through ``quick`` now and then; a send that fails (or finds no run open:
    it tries to open one again) keeps them for later. :meth:`open`, after the step's output
    is written, opens the run with the full retries and sends what is left.
    """

    def __init__(self, tracking: Tracking, step: str, *, every: int = 100) -> None:
        from ..tracking.curves import CurveLogger

        self.tracking = tracking
        self.step = step
        self.quick: Any = None
        self.curves = CurveLogger(self, every=every)
        self._try_open()

    def _try_open(self) -> None:
        from ..errors import ServiceError
        from ..tracking.retry import RetryPolicy

        try:
            run = self.tracking.open(retry=RetryPolicy(attempts=1), step=self.step)
            run.set_tags({TAG_STEP + self.step: "running"})
        except ServiceError as exc:
            log.warning("%s: live curves wait for the tracking store (%s)", self.step, exc)
            return
        self.quick = run

    def log_batch(self, what: str, **batch: Any) -> None:
        """Send through the quick run (the CurveLogger's sends come here)."""
        if self.quick is None:
            self._try_open()
        if self.quick is None:
            from ..errors import ServiceError

            raise ServiceError(f"could not {what}: no MLflow run open yet")
        self.quick.log_batch(what, **batch)

    def open(self) -> Any:
        """The run, opened with the full retries, with the buffered curve points sent."""
        run = self.tracking.open(step=self.step)
        if self.curves.points:
            run.log_batch("log the allocator curves", metrics=self.curves.points)
            self.curves.points = []
        return run


def finish_step(run: Any, step: str, seconds: float) -> None:
    """Record a step as done with its wall time, and end the run (the next step reopens it)."""
    run.log_metrics({STEP_SECONDS.format(step=step): float(seconds)})
    run.set_tags({TAG_STEP + step: "done"})
    run.finish()


@contextlib.contextmanager
def failure_recorded(tracking: Tracking | None, step: str, run: Any = None) -> Iterator[None]:
    """Tag the run's step failed and end the run FAILED when the step's own work raises
    (a mistake in the input opens no run for it; it marks a run already open). A store
    that does not answer then is ignored: the step's error is the one to see."""
    try:
        yield
    except BaseException as exc:
        if tracking is not None and (run is not None or not isinstance(exc, UserError)):
            with contextlib.suppress(Exception):
                from ..tracking.retry import RetryPolicy

                run = run or tracking.open(retry=RetryPolicy(attempts=1), step=step)
                run.set_tags({TAG_STEP + step: "failed", TAG_FAILED_STEP: step})
                run.finish("FAILED")
        raise


def log_calibration(tracking: Tracking, info: Mapping[str, Any], batches: list[Any]) -> None:
    """calibrate: the calibration data as a dataset input (lineage: source and digest) and
    the params it fixes, by the same names and values that allocate logs."""
    run = tracking.named(info).open(step="calibrate")
    run.log_params(
        {
            "model_source": info["sources"]["model"],
            "model_digest": info["model"]["sha256"],
            "calibration_samples": info["samples"],
        }
    )
    run.log_dataset(batches, context="calibration", source=info["data"]["source"])
    finish_step(run, "calibrate", info["step_seconds"])


def log_allocation(run: Any, sparse_dir: str | os.PathLike, *, curves: bool = True) -> None:
    """allocate: the pipeline params, manifest and achieved sparsity, and the per-layer
    chart; the curves from the manifest's history unless the allocator's callback sent
    them already (``curves=False``)."""
    from ..charts import chart
    from ..sparse_model import read_manifest
    from ..tracking.params import pipeline_params

    manifest = read_manifest(sparse_dir)
    source, method, target = naming(manifest)
    name = run_name(source, method, target, "allocate", run.pipeline_run_id)
    run.store.call("name the run", run.client.update_run, run.run_id, name=name)
    run.log_params(pipeline_params(manifest))
    run.log_allocation(sparse_dir, history=None if curves else manifest.get("history"))
    with tempfile.TemporaryDirectory(prefix="fcpts-chart-") as tmp:
        title = f"{source}: {method} at target {manifest['target']:g}"
        png = chart(manifest["layers"], manifest["target"], Path(tmp) / CHART_ARTIFACT, title)
        run.log_chart(png)


def log_evaluation(
    run: Any,
    eval_dir: str | os.PathLike,
    metrics: Mapping[str, Any],
    *,
    sparse_net: Any,
    batches: list[Any],
    task: Any,
    data_source: str,
    model: bool = True,
    folder: str | os.PathLike | None = None,
) -> str | None:
    """evaluate: the evaluation data (dataset input), the metrics and reports, the gate's
    verdict and, with ``model``, the sparse model (a pyfunc serving ``folder``, the allocate
    output; see :mod:`fcpts.tracking.model_log`). Returns the logged model's URI."""
    out = Path(eval_dir)
    run.log_dataset(batches, context="evaluation", source=data_source)
    run.log_evaluation(out / "metrics.json", chart=out / CHART_ARTIFACT, report=out / "report.html")
    run.log_artifact(out / "report.md", "evaluation")
    gate = metrics.get("gate")
    if gate:
        run.set_tags(
            {
                TAG_GATE: "approved" if gate["approved"] else "rejected",
                TAG_GATE_REASONS: "; ".join(gate["reasons"])[:5000],
            }
        )
    from ..tracking.model_log import log_model

    if not model:
        return None
    return log_model(run, sparse_net, batches[0], task=task, folder=folder)
