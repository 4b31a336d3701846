"""MLflow tracking of fcpts pipeline runs.

Layout: one MLflow run per pipeline run, no child runs; every key says its step.

* Params (the same names on every run, ``n/a`` where a setting does not apply to the
  allocator): ``target``, ``allocator``, ``score``, ``lam``, ``lr``, ``weight_lr``,
  ``iters``, ``joint``, ``seed``, ``calibration_samples``, ``model_source``,
  ``model_digest`` (see :func:`pipeline_params`), then ``metric`` and
  ``evaluation_samples`` from the evaluate step.
* Metrics, grouped by step prefix: ``allocate/loss``, ``allocate/rec_loss``,
  ``allocate/constraint_loss``, ``allocate/global_sparsity`` (one point per allocator
  iteration: curves), ``allocate/achieved_sparsity``, ``allocate/exact``,
  ``allocate/zeros``, ``allocate/prunable``; ``evaluate/dense``, ``evaluate/sparse``,
  ``evaluate/delta`` (sparse - dense, in the unit of the metric named by the ``metric``
  param) and the other numbers of ``metrics.json``; ``<step>/seconds`` (wall time of
  calibrate, allocate, evaluate, register).
* Artifacts: ``allocation/manifest.json``, ``evaluation/metrics.json``, the chart and the
  report under ``evaluation/``; the sparse model as an MLflow PyTorch model (a logged
  model of the run, ``fcpts.model_uri`` tag); calibration and evaluation data as dataset
  inputs (context ``calibration`` / ``evaluation``) with their digests.
* Tags: ``fcpts.pipeline_run_id``, ``fcpts.version``, ``fcpts.git_commit`` (and MLflow's
  own ``mlflow.source.git.commit``, shown by the UI), ``fcpts.step.<step>`` (running,
  done, failed), ``fcpts.failed_step``.

Why one run and not a parent with a child run per step: MLflow compares *runs*. With one
run per pipeline, the experiment table has one row per pipeline and the compare view puts
a pipeline's settings (``target``, ``lam``) and its results (``evaluate/sparse``,
``allocate/achieved_sparsity``) in the same column, so the parallel-coordinates, scatter
and contour plots can relate a setting to a result (e.g. ``target`` against
``evaluate/sparse``). With child runs the settings sit on the allocate child and the
results on the evaluate child: those plots cannot pair them, the table shows four rows
per pipeline with mostly empty cells, and comparing two pipelines means picking eight
runs. The step prefixes keep the steps apart where it matters: MLflow's chart view groups
metrics into one section per prefix (``allocate``, ``evaluate``, ...), and the allocator
curves of several pipelines overlay in one chart. A step's status and wall time stay
visible as the ``fcpts.step.<step>`` tag and the ``<step>/seconds`` metric.

Steps may run in separate processes (or containers): each opens the same MLflow run with
:meth:`PipelineRun.open` and the pipeline run id, which finds the run by its
``fcpts.pipeline_run_id`` tag (or creates it).
"""

from __future__ import annotations

import contextlib
import copy
import getpass
import json
import logging
import math
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from torch import nn

from .. import __version__
from ..digests import tensors_sha256
from ..errors import ServiceError, UserError
from ..sparse_model import MANIFEST_FILE, read_manifest
from .connection import DEFAULT_EXPERIMENT, DEFAULT_ROOT, RetryPolicy, Store, redact
from .names import (
    CURVE_PREFIX,
    METRIC_ACHIEVED,
    METRIC_DELTA,
    METRIC_DENSE,
    METRIC_EXACT,
    METRIC_SPARSE,
    NA,
    PARAM_NAMES,
    PIPELINE_RUN_ID_RE,
    STEP_SECONDS,
    TAG_DIGEST,
    TAG_FAILED_STEP,
    TAG_GIT_COMMIT,
    TAG_GIT_DIRTY,
    TAG_HIGHER_IS_BETTER,
    TAG_MODEL_ID,
    TAG_MODEL_URI,
    TAG_PIPELINE_RUN_ID,
    TAG_STEP,
    TAG_VERSION,
)

log = logging.getLogger(__name__)

DATASET_CONTEXT_TAG = "mlflow.data.context"
MODEL_NAME = "sparse_model"

_BAD_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. /:]")


# -------------------------------------------------------------------------- small helpers


def new_pipeline_run_id() -> str:
    """A fresh pipeline run id: UTC time plus 8 random hex digits (sorts by start time)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def metric_key(key: str) -> str:
    """key with the characters MLflow refuses in metric names replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", str(key))


def _param_value(value: Any) -> str:
    if value is None:
        return NA
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) or NA
    return redact(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout fcpts runs from, or (None, None).

    ``$FCPTS_GIT_COMMIT`` wins (for images built without ``.git``). The checkout counts only
    when it tracks fcpts's own ``__init__.py``: a virtual environment inside some other
    repository does not lend fcpts that repository's commit.
    """
    env = os.environ.get("FCPTS_GIT_COMMIT", "").strip()
    if env:
        return env, None
    here = Path(__file__).resolve().parent.parent / "__init__.py"  # fcpts/__init__.py

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", "-C", str(here.parent), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", here.name)
    if tracked is None or tracked.returncode != 0:
        return None, None
    head = git("rev-parse", "HEAD")
    if (
        head is None
        or head.returncode != 0
        or not re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip())
    ):
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return head.stdout.strip(), dirty


def model_digest(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's state_dict (names, dtypes, shapes and bytes), so two
    runs from the same weights share a digest whatever file they were read from."""
    return "sha256:" + tensors_sha256(sorted(model.state_dict().items()))


def pipeline_params(
    manifest: Mapping[str, Any],
    *,
    model_source: str | None = None,
    model_digest: str | None = None,
    calibration_samples: int | None = None,
) -> dict[str, str]:
    """The params every fcpts run logs, by their stable names (:data:`PARAM_NAMES`), from an
    allocation manifest (``read_manifest(dir)``). ``model_source``, ``model_digest`` and
    ``calibration_samples`` default to the manifest's ``sources.model``,
    ``dense_model_sha256`` and ``calibration.samples`` (written by ``fcpts allocate``).
    Whatever is unknown or does not apply to the allocator is ``n/a``. Values are strings,
    credentials removed."""
    settings = manifest.get("settings") or {}
    sources = manifest.get("sources") or {}
    calibration = manifest.get("calibration") or {}
    values = {
        "target": manifest.get("target"),
        "allocator": manifest.get("method"),
        "score": manifest.get("score"),
        "lam": settings.get("lam"),
        "lr": settings.get("lr"),
        "weight_lr": settings.get("weight_lr"),
        "iters": settings.get("iters"),
        "joint": settings.get("joint"),
        "seed": settings.get("seed", manifest.get("seed")),
        "calibration_samples": calibration_samples
        if calibration_samples is not None
        else calibration.get("samples"),
        "model_source": model_source or sources.get("model"),
        "model_digest": model_digest or manifest.get("dense_model_sha256"),
    }
    return {k: _param_value(values[k]) for k in PARAM_NAMES}


def _numbers(data: Mapping[str, Any], prefix: str, depth: int = 2) -> dict[str, float]:
    """The finite numbers (booleans as 1/0) of a JSON-like dict, nested keys joined by '.'."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = 1.0 if value else 0.0
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, Mapping) and depth > 1:
            out.update(_numbers(value, f"{name}.", depth - 1))
    return out


# ------------------------------------------------------------------------------ datasets


def _batch_tensors(batch: Any) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return {"x": batch}
    if isinstance(batch, np.ndarray):
        return {"x": torch.from_numpy(batch)}
    if isinstance(batch, Mapping):
        return {str(k): v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    if isinstance(batch, (list, tuple)):
        return {f"input_{i}": v for i, v in enumerate(batch) if isinstance(v, torch.Tensor)}
    raise UserError(
        f"cannot log a dataset of {type(batch).__name__} batches: give tensors or dicts of tensors"
    )


def batches_digest(batches: Sequence[Any]) -> str:
    """16 hex digits of the sha256 of every tensor of every batch (key, dtype, shape, bytes)."""
    return tensors_sha256(kt for b in batches for kt in sorted(_batch_tensors(b).items()))[:16]


def _batches_numpy(batches: Sequence[Any]) -> dict[str, np.ndarray] | None:
    """All batches concatenated per key, or None when they do not line up (ragged)."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in batches:
        tensors = _batch_tensors(batch)
        if parts and set(tensors) != set(parts):
            return None
        for key, t in tensors.items():
            parts.setdefault(key, []).append(t.detach().to("cpu").numpy())
    try:
        return {k: np.concatenate(v) for k, v in parts.items()} or None
    except (ValueError, TypeError):
        return None


def _dataset_source(source: Any):
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if isinstance(source, DatasetSource):
        return source
    text = redact(source)
    if "://" in text:
        with contextlib.suppress(Exception):
            return resolve_dataset_source(text)
    # built-in demos and other sources MLflow has no resolver for
    return CodeDatasetSource(tags={"fcpts.source": text})


# ------------------------------------------------------------------------------ curves


class CurveLogger:
    """The allocator's ``callback(step, record)``: buffers each record as step-indexed
    metrics ``<prefix>/<key>`` and sends them with ``log_batch`` every ``every`` steps or
    ``seconds`` seconds, whichever comes first, so the UI draws the curves while the
    allocator runs without one request per iteration.

    A failed send inside the callback keeps the points for the next send (the allocation
    is not stopped by a tracking hiccup); :meth:`close` sends the rest and raises
    ServiceError if the store is still unreachable.
    """

    def __init__(
        self,
        run: PipelineRun,
        prefix: str = CURVE_PREFIX,
        *,
        every: int = 100,
        seconds: float = 10.0,
    ):
        self.run = run
        self.prefix = prefix.rstrip("/")
        self.every = max(1, int(every))
        self.seconds = float(seconds)
        self.points: list[Metric] = []
        self.steps = 0
        self.pending_steps = 0
        self._last_send = time.monotonic()
        self._warned = False

    def __call__(self, step: int, record: Mapping[str, Any]) -> None:
        ts = _now_ms()
        for key, value in record.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.points.append(
                Metric(metric_key(f"{self.prefix}/{key}"), float(value), ts, int(step))
            )
        self.steps += 1
        self.pending_steps += 1
        if self.pending_steps >= self.every or time.monotonic() - self._last_send >= self.seconds:
            try:
                self.flush()
            except ServiceError as exc:
                if not self._warned:
                    log.warning("allocator curves not sent yet (will retry): %s", exc)
                    self._warned = True

    def flush(self) -> None:
        self._last_send = time.monotonic()
        if not self.points:
            return
        points = self.points
        self.run._log_batch("log the allocator curves", metrics=points)
        self.points = []
        self.pending_steps = 0

    close = flush

    def __enter__(self) -> CurveLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------- the run


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
        tags: Mapping[str, Any] | None = None,
        root: str | os.PathLike = DEFAULT_ROOT,
        retry: RetryPolicy | None = None,
    ) -> PipelineRun:
        """The MLflow run of pipeline run ``pipeline_run_id`` in ``experiment``: found by its
        ``fcpts.pipeline_run_id`` tag, else created (a new id when None). Marks it RUNNING.

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
            if run.info.status != "RUNNING":
                store.call(
                    "reopen the run", store.client.update_run, run.info.run_id, status="RUNNING"
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
            tags={k: redact(v) for k, v in cls._standard_tags(pid).items()},
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

    @staticmethod
    def _standard_tags(pid: str) -> dict[str, str]:
        tags = {
            TAG_PIPELINE_RUN_ID: pid,
            TAG_VERSION: __version__,
            "mlflow.source.name": "fcpts",
            "mlflow.source.type": "LOCAL",
        }
        with contextlib.suppress(Exception):
            tags["mlflow.user"] = getpass.getuser()
        commit, dirty = git_commit()
        if commit:
            tags[TAG_GIT_COMMIT] = commit
            tags["mlflow.source.git.commit"] = commit
        if dirty is not None:
            tags[TAG_GIT_DIRTY] = str(dirty).lower()
        return tags

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
                self._log_batch(
                    f"record the failure of step {name}",
                    metrics=[
                        Metric(metric_key(STEP_SECONDS.format(step=name)), seconds, _now_ms(), 0)
                    ],
                    tags=[RunTag(TAG_STEP + name, "failed"), RunTag(TAG_FAILED_STEP, name)],
                )
                self.store.call("end the run", self.client.set_terminated, self.run_id, "FAILED")
            raise
        seconds = time.perf_counter() - start
        self._log_batch(
            f"record step {name}",
            metrics=[Metric(metric_key(STEP_SECONDS.format(step=name)), seconds, _now_ms(), 0)],
            tags=[RunTag(TAG_STEP + name, "done")],
        )

    # -- params, metrics, tags

    def _log_batch(self, what: str, *, metrics=(), params=(), tags=()) -> None:
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
        self._log_batch(
            "log params", params=[Param(str(k), _param_value(v)) for k, v in params.items()]
        )

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        """Log numeric metrics at ``step`` in one request (booleans as 1/0)."""
        ts = _now_ms()
        points = [Metric(metric_key(k), float(v), ts, int(step)) for k, v in metrics.items()]
        self._log_batch("log metrics", metrics=points)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags (values as strings, credentials removed)."""
        self._log_batch("set tags", tags=[RunTag(str(k), redact(v)) for k, v in tags.items()])

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
        src = _dataset_source(source)
        name = name or context
        arrays = _batches_numpy(batches)
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
        """Log the allocate step's output folder: ``manifest.json`` as an artifact under
        ``allocation/`` and the metrics ``allocate/achieved_sparsity``, ``allocate/exact``
        (1 or 0), ``allocate/zeros``, ``allocate/prunable``; plus ``history`` as curves when
        given (leave it out if a :meth:`curve_logger` already sent them). Returns the
        manifest."""
        data = read_manifest(sparse_dir)
        self.log_artifact(Path(sparse_dir) / MANIFEST_FILE, "allocation")
        self.log_metrics(
            {
                METRIC_ACHIEVED: data["achieved_sparsity"],
                METRIC_EXACT: 1.0 if data.get("exact") else 0.0,
                "allocate/zeros": data["zeros"],
                "allocate/prunable": data["prunable"],
            }
        )
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
        path, with at least ``metric``, ``dense``, ``sparse``) as ``evaluate/dense``,
        ``evaluate/sparse``, ``evaluate/delta`` and ``evaluate/<key>`` for its other numbers
        (nested ones as ``evaluate/size.<key>``); the params ``metric`` and
        ``evaluation_samples`` (default: ``samples`` or ``evaluation.samples``); the tag
        ``fcpts.higher_is_better`` when the metrics say; ``metrics.json``, ``chart`` and
        ``report`` as artifacts under ``evaluation/``. Returns the metrics dict."""
        if isinstance(metrics, Mapping):
            data = dict(metrics)
            self.log_dict(data, "evaluation/metrics.json")
        else:
            path = Path(metrics)
            try:
                data = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise UserError(f"cannot read the evaluation metrics {path}: {exc}") from None
            self.log_artifact(path, "evaluation")
        missing = [k for k in ("metric", "dense", "sparse") if k not in data]
        if missing:
            raise UserError(
                f"the evaluation metrics have no {', '.join(missing)}: rerun `fcpts evaluate`"
            )
        dense, sparse = float(data["dense"]), float(data["sparse"])
        values: dict[str, float] = {
            METRIC_DENSE: dense,
            METRIC_SPARSE: sparse,
            METRIC_DELTA: sparse - dense,
        }
        skip = {"metric", "dense", "sparse", "achieved_sparsity", "target", "higher_is_better"}
        skip |= {"layers", "gate", "step_seconds", "fcpts_version", "format"}
        rest = {k: v for k, v in data.items() if k not in skip}
        values.update({k: v for k, v in _numbers(rest, "evaluate/").items() if k not in values})
        self.log_metrics(values)
        if samples is None:
            nested = data.get("evaluation") if isinstance(data.get("evaluation"), Mapping) else {}
            samples = data.get("samples") or nested.get("samples")
        self.log_params({"metric": data["metric"], "evaluation_samples": samples})
        if "higher_is_better" in data:
            self.set_tags({TAG_HIGHER_IS_BETTER: str(bool(data["higher_is_better"])).lower()})
        for extra in (chart, report):
            if extra is not None:
                self.log_artifact(extra, "evaluation")
        return data

    def log_model(
        self,
        model: nn.Module,
        example: Any,
        *,
        task: Any = None,
        name: str = MODEL_NAME,
    ) -> str:
        """Log ``model`` with MLflow's PyTorch flavour as a logged model of this run and
        return its URI (``models:/m-...``, also the run tag ``fcpts.model_uri``).

        ``example`` is one batch (``task.split`` turns it into the call arguments when a task
        is given); its first two rows become the input example and the signature (batch
        dimension -1). A model that takes tensors positionally is saved in MLflow's
        ``pt2`` format (``torch.export``: loading it unpickles nothing and needs no fcpts
        code); one that takes keyword arguments or that ``torch.export`` cannot trace is
        pickled instead (loading it needs fcpts and the model's code installed).
        """
        from mlflow.models import ModelSignature, infer_signature
        from mlflow.types import Schema, TensorSpec

        args, kwargs = _example_args(example, task)
        if any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).to("cpu")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model(*args, **kwargs)
            arrays = {k: v.numpy() for k, v in kwargs.items()}
            out_np = out.detach().numpy() if isinstance(out, torch.Tensor) else None
            pip = [f"torch=={torch.__version__.split('+')[0]}"]
            info = None
            if not kwargs:
                signature = infer_signature(args[0].numpy(), out_np)
                if len(args) > 1:
                    signature = ModelSignature(
                        inputs=Schema(
                            [
                                TensorSpec(a.numpy().dtype, (-1, *a.shape[1:]), name=f"input_{i}")
                                for i, a in enumerate(args)
                            ]
                        ),
                        outputs=signature.outputs,
                    )
                try:
                    with self.store.fluent(self.experiment_id):
                        info = self.store.call(
                            "log the sparse model",
                            mlflow.pytorch.log_model,
                            model,
                            name=name,
                            signature=signature,
                            input_example=args[0].numpy()
                            if len(args) == 1
                            else tuple(a.numpy() for a in args),
                            pip_requirements=pip,
                            serialization_format="pt2",
                            run_id=self.run_id,
                        )
                except ServiceError:
                    raise
                except Exception as exc:  # torch.export could not trace this model
                    log.warning(
                        "torch.export failed (%s); logging the model pickled",
                        str(exc).splitlines()[0][:200],
                    )
            if info is None:
                example_in = arrays or (
                    args[0].numpy()
                    if len(args) == 1
                    else {f"input_{i}": a.numpy() for i, a in enumerate(args)}
                )
                signature = infer_signature(example_in, out_np)
                with self.store.fluent(self.experiment_id):
                    info = self.store.call(
                        "log the sparse model",
                        mlflow.pytorch.log_model,
                        model,
                        name=name,
                        signature=signature,
                        input_example=example_in,
                        pip_requirements=[*pip, f"fcpts=={__version__}"],
                        serialization_format="pickle",
                        run_id=self.run_id,
                    )
        finally:
            model.train(was_training)
        self.set_tags({TAG_MODEL_URI: info.model_uri, TAG_MODEL_ID: info.model_id})
        return info.model_uri


def _example_args(
    example: Any, task: Any
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) of a model call on the first two rows of ``example`` (one row is
    repeated: ``torch.export`` keeps the batch dimension dynamic only when it is > 1)."""
    if task is not None:
        args, kwargs = task.split(example)
    elif isinstance(example, Mapping) and "x" in example:
        args, kwargs = (example["x"],), {}
    elif isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    elif isinstance(example, (list, tuple)):
        args, kwargs = tuple(example), {}
    else:
        args, kwargs = (example,), {}

    def rows(t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise UserError(f"the example batch must hold tensors, got {type(t).__name__}")
        t = t.detach().to("cpu")
        if t.dim() == 0:
            raise UserError(
                "the example batch holds a 0-d tensor: give a batch with a batch dimension"
            )
        t = t[:2]
        return torch.cat([t, t]) if t.shape[0] == 1 else t

    return tuple(rows(a) for a in args), {k: rows(v) for k, v in kwargs.items()}
