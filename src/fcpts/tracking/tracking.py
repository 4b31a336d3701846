"""MLflow tracking of fcpts pipeline runs.

Layout: one MLflow run per pipeline run, no child runs; every key says its step.

* Params (the same names on every run, ``n/a`` where a setting does not apply to the
  allocator): ``target``, ``allocator``, ``score``, ``seed``, ``calibration_samples``,
  ``model_source``, ``model_digest``, ``prunable`` and every declared setting of every
  method by its flag's name (see :func:`pipeline_params`), then ``metric``,
  ``evaluation_samples``, ``evaluation_seed``, ``eval_batch_size`` and the latency
  settings from the evaluate step.
* Metrics, what a run measured, grouped by step prefix: ``allocate/loss``,
  ``allocate/rec_loss``, ``allocate/constraint_loss``, ``allocate/global_sparsity`` (one
  point per allocator iteration: curves), ``allocate/achieved_sparsity``,
  ``allocate/zeros``; ``evaluate/dense``, ``evaluate/sparse``, ``evaluate/delta``
  (sparse - dense, in the unit of the metric named by the ``metric`` param), size and
  latency; ``<step>/seconds`` (wall time of calibrate, allocate, evaluate, register).
  Constants of the run are params or tags, not metrics: :mod:`fcpts.tracking.outputs`
  classifies every number of ``metrics.json``.
* Artifacts: ``allocation.png`` (the per-layer chart) and ``layers.json`` (the per-layer
  table, an MLflow table) at the root, the same paths on every run, so the compare view
  shows them side by side; ``allocation/manifest.json``, ``evaluation/metrics.json`` and
  the reports under ``evaluation/``; the sparse model as an MLflow model (a logged model
  of the run, ``fcpts.model_uri`` tag); calibration and evaluation data as dataset inputs
  (context ``calibration`` / ``evaluation``) with their digests.
* Tags: ``fcpts.pipeline_run_id``, ``fcpts.version``, ``fcpts.git_commit`` (and MLflow's
  own ``mlflow.source.git.commit``, shown by the UI), ``fcpts.step.<step>`` (running,
  done, failed), ``fcpts.failed_step``, and the checks ``fcpts.exact``,
  ``fcpts.counts_match_manifest``, ``fcpts.same_data_as_calibration``,
  ``fcpts.evaluation_overlap``. The run is named by model, method and target
  (:func:`fcpts.tracking.names.run_name`).

Why one run and not a parent with a child run per step: MLflow compares *runs*, so a
pipeline's settings and results must sit on one run for the compare view's plots to relate
them (the README's tracking section says more); the step prefixes keep the steps apart.

Steps may run in separate processes (or containers): each opens the same MLflow run with
:meth:`PipelineRun.open` and the pipeline run id, which finds the run by its
``fcpts.pipeline_run_id`` tag (or creates it).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from torch import nn

from ..errors import UserError
from ..sparse_model import MANIFEST_FILE, read_manifest
from .connection import DEFAULT_EXPERIMENT, DEFAULT_ROOT, Store
from .curves import CurveLogger
from .datasets import batches_digest, batches_numpy, dataset_source
from .model_log import MODEL_NAME, log_model
from .names import (
    CHART_ARTIFACT,
    CURVE_PREFIX,
    LAYERS_TABLE,
    PIPELINE_RUN_ID_RE,
    STEP_SECONDS,
    TAG_DIGEST,
    TAG_FAILED_STEP,
    TAG_HIGHER_IS_BETTER,
    TAG_PIPELINE_RUN_ID,
    TAG_STEP,
)
from .outputs import allocation_record, evaluation_record, layers_table, read_metrics
from .params import metric_key, now_ms, param_value, pipeline_params
from .provenance import git_commit, model_digest, new_pipeline_run_id, standard_tags
from .redaction import redact
from .retry import RetryPolicy

__all__ = [
    "CurveLogger",
    "PipelineRun",
    "batches_digest",
    "git_commit",
    "model_digest",
    "new_pipeline_run_id",
    "pipeline_params",
]

DATASET_CONTEXT_TAG = "mlflow.data.context"


class PipelineRun:
    """The MLflow run of one fcpts pipeline run. Use :meth:`open`."""

    def __init__(self, store: Store, run_id: str, experiment_id: str, pipeline_run_id: str):
        self.store = store
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.pipeline_run_id = pipeline_run_id
        self._loggers: list[CurveLogger] = []

    def __repr__(self) -> str:
        return f"PipelineRun(run_id={self.run_id!r}, pipeline_run_id={self.pipeline_run_id!r}, tracking_uri={self.tracking_uri!r})"

    @property
    def tracking_uri(self) -> str:
        """The store's URI, credentials removed (safe to print)."""
        return self.store.safe_uri

    @property
    def client(self) -> mlflow.MlflowClient:
        return self.store.client

    # -- open / close

    @classmethod
    def open(
        cls,
        pipeline_run_id: str | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str = DEFAULT_EXPERIMENT,
        run_name: str | None = None,
        rename: bool = False,
        tags: Mapping[str, Any] | None = None,
        root: str | os.PathLike = DEFAULT_ROOT,
        retry: RetryPolicy | None = None,
    ) -> PipelineRun:
        """The MLflow run of pipeline run ``pipeline_run_id`` in ``experiment``: found by its
        ``fcpts.pipeline_run_id`` tag, else created (a new id when None) and named
        ``run_name``. Marks it RUNNING; with ``rename`` a found run takes ``run_name`` too.

        ``tracking_uri`` defaults to ``$MLFLOW_TRACKING_URI``, else the embedded
        ``sqlite:///<root>/mlflow.db``. Raises ServiceError when the store cannot be
        reached (after retries), UserError for an invalid pipeline run id.
        """
        pid = pipeline_run_id or new_pipeline_run_id()
        if not PIPELINE_RUN_ID_RE.match(pid):
            raise UserError(
                f"pipeline run id {pid!r} is not valid: use 1-128 letters, digits, '.', '_' or '-'"
            )
        store = Store(tracking_uri, retry=retry, root=root)
        exp_id = store.experiment_id(experiment)
        found = cls._find(store, exp_id, pid)
        if found:
            run = found[0]
            name = run_name if rename and run_name and run_name != run.info.run_name else None
            if run.info.status != "RUNNING" or name:
                store.call(
                    "reopen the run",
                    store.client.update_run,
                    run.info.run_id,
                    status="RUNNING",
                    name=name,
                )
            self = cls(store, run.info.run_id, exp_id, pid)
            if tags:
                self.set_tags(tags)
            return self
        run = store.call(
            "create the run",
            store.client.create_run,
            exp_id,
            run_name=run_name or f"fcpts-{pid}",
            tags={k: redact(v) for k, v in standard_tags(pid).items()},
        )
        self = cls(store, run.info.run_id, exp_id, pid)
        # two processes that opened the same new pipeline run at once: keep the oldest run
        found = cls._find(store, exp_id, pid)
        if found and found[0].info.run_id != self.run_id:
            store.call("remove a duplicate run", store.client.delete_run, self.run_id)
            self.run_id = found[0].info.run_id
        if tags:
            self.set_tags(tags)
        return self

    @staticmethod
    def _find(store: Store, exp_id: str, pid: str) -> list:
        runs = store.call(
            "search the runs",
            store.client.search_runs,
            [exp_id],
            filter_string=f"tags.`{TAG_PIPELINE_RUN_ID}` = '{pid}'",
            max_results=50,
        )
        return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))

    def finish(self, status: str = "FINISHED") -> None:
        """Send pending curves and end the run with ``status`` (FINISHED, FAILED, KILLED)."""
        for logger in self._loggers:
            logger.close()
        self.store.call("end the run", self.client.set_terminated, self.run_id, status)

    # -- steps

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[PipelineRun]:
        """Time a pipeline step: tag ``fcpts.step.<name>`` running, then done with the metric
        ``<name>/seconds``; on an exception tag it failed, set ``fcpts.failed_step`` and end
        the run FAILED (tracking errors never hide the step's own error)."""
        self.set_tags({TAG_STEP + name: "running"})
        start = time.perf_counter()
        try:
            yield self
        except BaseException:
            seconds = time.perf_counter() - start
            with contextlib.suppress(Exception):
                self.log_batch(
                    f"record the failure of step {name}",
                    metrics=[
                        Metric(metric_key(STEP_SECONDS.format(step=name)), seconds, now_ms(), 0)
                    ],
                    tags=[RunTag(TAG_STEP + name, "failed"), RunTag(TAG_FAILED_STEP, name)],
                )
                self.store.call("end the run", self.client.set_terminated, self.run_id, "FAILED")
            raise
        seconds = time.perf_counter() - start
        self.log_batch(
            f"record step {name}",
            metrics=[Metric(metric_key(STEP_SECONDS.format(step=name)), seconds, now_ms(), 0)],
            tags=[RunTag(TAG_STEP + name, "done")],
        )

    # -- params, metrics, tags

    def log_batch(self, what: str, *, metrics=(), params=(), tags=()) -> None:
        self.store.call(
            what,
            self.client.log_batch,
            self.run_id,
            metrics=list(metrics),
            params=list(params),
            tags=list(tags),
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log params (values as strings, credentials removed; None becomes ``n/a``). A param
        keeps its first value: logging a different value later raises ServiceError."""
        self.log_batch(
            "log params", params=[Param(str(k), param_value(v)) for k, v in params.items()]
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log numeric metrics at ``step`` in one request (booleans as 1/0)."""
        ts = now_ms()
        points = [Metric(metric_key(k), float(v), ts, int(step)) for k, v in metrics.items()]
        self.log_batch("log metrics", metrics=points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings, credentials removed)."""
        self.log_batch("set tags", tags=[RunTag(str(k), redact(v)) for k, v in tags.items()])

    def log_history(
        self, history: Sequence[Mapping[str, Any]], prefix: str = CURVE_PREFIX, start_step: int = 0
    ) -> int:
        """Log a list of per-iteration records (``allocation.history``) as step-indexed
        metrics ``<prefix>/<key>`` in batches (at most 1000 points a request); returns the
        number of points. Use this or :meth:`curve_logger`, not both."""
        logger = CurveLogger(self, prefix, every=len(history) + 1, seconds=math.inf)
        for i, record in enumerate(history):
            logger(start_step + i, record)
        n = len(logger.points)
        logger.flush()
        return n

    def curve_logger(
        self, prefix: str = CURVE_PREFIX, *, every: int = 100, seconds: float = 10.0
    ) -> CurveLogger:
        """A ``callback(step, record)`` for ``sparsify(..., callback=...)``; see
        :class:`CurveLogger`. :meth:`finish` closes it if you do not."""
        logger = CurveLogger(self, prefix, every=every, seconds=seconds)
        self._loggers.append(logger)
        return logger

    # -- artifacts

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        p = Path(path)
        if not p.exists():
            raise UserError(f"cannot log {p}: no such file or folder")
        fn = self.client.log_artifacts if p.is_dir() else self.client.log_artifact
        self.store.call(f"upload {p.name}", fn, self.run_id, str(p), artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.store.call(
            f"upload {artifact_file}", self.client.log_dict, self.run_id, dict(data), artifact_file
        )

    def log_dataset(
        self,
        batches: Sequence[Any],
        *,
        context: str,
        source: Any,
        name: str | None = None,
        digest: str | None = None,
    ) -> str:
        """Record a dataset input of the run (``context``: ``calibration`` or ``evaluation``).

        ``source`` says where the data came from (``demo:digits-cnn``, ``s3://...``, a path:
        credentials removed); ``digest`` defaults to :func:`batches_digest`. Tensors that
        line up are logged as a NumPy dataset (schema and row count in the UI), ragged ones
        (e.g. token batches of different lengths) as a meta dataset. Also tags the run
        ``fcpts.<context>_digest``. Returns the digest.
        """
        from mlflow.data.meta_dataset import MetaDataset

        digest = digest or batches_digest(batches)
        src = dataset_source(source)
        name = name or context
        arrays = batches_numpy(batches)
        if arrays is not None:
            ds = mlflow.data.from_numpy(arrays, source=src, name=name, digest=digest)
        else:
            ds = MetaDataset(src, name=name, digest=digest)
        entity = DatasetInput(ds._to_mlflow_entity(), tags=[InputTag(DATASET_CONTEXT_TAG, context)])
        self.store.call(
            f"log the {context} dataset", self.client.log_inputs, self.run_id, datasets=[entity]
        )
        self.set_tags({TAG_DIGEST.format(context=context): digest})
        return digest

    # -- step outputs

    def log_allocation(
        self, sparse_dir: str | os.PathLike, *, history: Sequence[Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Log the allocate step's output folder: ``manifest.json`` under ``allocation/``,
        the MLflow table ``layers.json``, the metrics and tags of
        :func:`fcpts.tracking.outputs.allocation_record`; ``history`` as curves when given
        (not if a :meth:`curve_logger` sent them). Returns the manifest."""
        data = read_manifest(sparse_dir)
        self.log_artifact(Path(sparse_dir) / MANIFEST_FILE, "allocation")
        table = layers_table(data["layers"])
        self.store.call(
            "upload the layers", self.client.log_table, self.run_id, table, LAYERS_TABLE
        )
        metrics, tags = allocation_record(data)
        self.log_metrics(metrics)
        self.set_tags(tags)
        if history:
            self.log_history(history)
        return data

    def log_evaluation(
        self,
        metrics: Mapping[str, Any] | str | os.PathLike,
        *,
        chart: str | os.PathLike | None = None,
        report: str | os.PathLike | None = None,
        samples: int | None = None,
    ) -> dict[str, Any]:
        """Log the evaluate step's output: ``metrics`` (the dict or the ``metrics.json``
        path, with at least ``metric``, ``dense``, ``sparse``) as metrics, params and tags
        (:func:`fcpts.tracking.outputs.evaluation_record`; ``evaluation_samples`` defaults
        to ``samples``), the tag ``fcpts.higher_is_better`` when the metrics say;
        ``metrics.json`` and ``report`` under ``evaluation/``, ``chart`` at
        ``allocation.png`` (:meth:`log_chart`). Returns the metrics dict."""
        data = read_metrics(metrics)
        if isinstance(metrics, Mapping):
            self.log_dict(data, "evaluation/metrics.json")
        else:
            self.log_artifact(metrics, "evaluation")
        values, params, tags = evaluation_record(data)
        self.log_metrics(values)
        if samples is not None or params["evaluation_samples"] is None:
            params["evaluation_samples"] = samples if samples is not None else data.get("samples")
        self.log_params(params)
        if "higher_is_better" in data:
            tags[TAG_HIGHER_IS_BETTER] = str(bool(data["higher_is_better"])).lower()
        self.set_tags(tags)
        if chart is not None:
            self.log_chart(chart)
        if report is not None:
            self.log_artifact(report, "evaluation")
        return data

    def log_chart(self, chart: str | os.PathLike) -> None:
        """The per-layer chart (a PNG) at ``allocation.png``, the artifact root: the same
        path on every run, whatever the file is called, for the compare view."""
        p = Path(chart)
        if p.name == CHART_ARTIFACT or not p.is_file():
            return self.log_artifact(p)
        with tempfile.TemporaryDirectory(prefix="fcpts-chart-") as tmp:
            self.log_artifact(shutil.copyfile(p, Path(tmp) / CHART_ARTIFACT))

    def log_model(
        self,
        model: nn.Module,
        example: Any,
        *,
        task: Any = None,
        name: str = MODEL_NAME,
    ) -> str:
        """Log ``model`` as a logged model of this run; see
        :func:`fcpts.tracking.model_log.log_model`. Returns its URI."""
        return log_model(self, model, example, task=task, name=name)
