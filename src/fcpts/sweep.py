"""Hyperparameter sweeps of the fcpts allocator with Optuna.

One study searches the fcpts settings ``lam``, ``lr`` (threshold learning rate),
``weight_lr``, ``iters`` and ``ste_width`` and the importance score (magnitude or wanda)
for one model, one target and one data source. The objective is the task metric of the
sparse model on the **validation** split (top-1 for classifiers, mean cosine to the dense
embeddings for encoders, minus the relative output MSE for anything else: higher is
better), disjoint from the calibration split the allocator learns on and from the
evaluation split that ``fcpts evaluate`` reports on.

* **Exact target as a constraint.** Every trial records ``|zeros - round(S x N)| / N`` as
  the constraint ``exact_target`` (``Trial.set_constraint``, which TPESampler reads; on
  Optuna < 5 through ``TPESampler(constraints_func=...)``) and as the user attribute
  ``constraint``. A trial with a value above 0 is infeasible: the sampler ranks it below
  every feasible trial, and :func:`select_best` never returns it (the best trial is picked
  here among feasible COMPLETE trials, not taken from ``study.best_trial``).
* **Pruning.** Every ``report_every`` iterations a trial reports minus the mean
  reconstruction loss of the last window (``trial.report``, higher is better like the
  objective); a :class:`~optuna.pruners.MedianPruner` stops trials that fall below the
  median of earlier trials at the same iteration. The baseline trial is never pruned.
* **Baseline.** The library's default settings (score ``wanda``, as ``score="auto"`` picks
  with data; ``iters`` clipped to the searched range so both run on the same budget) are
  enqueued as the study's first trial, evaluated on the same validation split.
* **Storage.** A SQLite file ``<out>/study.db`` by default, or any SQLAlchemy URL
  (``postgresql+psycopg2://user@host/db``) for workers on several machines sharing one
  study. The study records its own configuration (model, data, target, search space ...),
  so a worker needs only the storage and the study name, and a study reopened with
  different options is refused. Trials carry a heartbeat: a trial left RUNNING by a
  killed process is marked FAIL once its heartbeat is older than the grace period (on
  resume, and whenever a worker starts a trial) and re-queued once with the same
  parameters. Trial numbers continue across resumptions.
* **MLflow** (optional: only with a tracking URI or ``$MLFLOW_TRACKING_URI``): one parent
  run per study (reopened on resume), one nested run per finished trial with its params,
  value, state and reconstruction curve; the best trial's settings tagged on the parent
  (``best.<name>``) with ``best.json`` and the study plot as artifacts.
* **Output** (``out_dir``): ``best.json`` (value, params = the fcpts settings dict, score,
  trial, baseline, dense value, trial counts), ``allocate.json`` (a ``--config`` file for
  ``fcpts allocate`` with the best settings), ``trials.json`` and ``study.png``
  (optimisation history and parameter importances).

Entry points: :func:`run_sweep` (prepare, run ``workers`` processes, finish) and its three
parts :func:`prepare_study`, :func:`run_worker` and :func:`finish_sweep`, which the Kubeflow
pipeline (``pipelines/sweep.py``) runs as separate steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .errors import FcptsError, ServiceError, UserError

FORMAT = "fcpts.sweep/1"
BEST_FILE = "best.json"
ALLOCATE_FILE = "allocate.json"
TRIALS_FILE = "trials.json"
PLOT_FILE = "study.png"
STUDY_DB = "study.db"
DEFAULT_EXPERIMENT = "fcpts-sweep"
SWEPT = ("lam", "lr", "weight_lr", "iters", "ste_width")
SCORES = ("magnitude", "wanda")
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
RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


# ------------------------------------------------------------------------ search space


def _pair(value: Any, name: str, cast: Callable[[Any], Any]) -> tuple[Any, Any]:
    if isinstance(value, str):
        lo, sep, hi = value.partition(":")
        value = (lo, hi if sep else lo)
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"search range of {name} must be LO:HI numbers, got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched (floats on a log scale, ``iters`` uniform integers). A range
    with ``lo == hi`` fixes that setting; ``score`` lists the scores tried."""

    lam: tuple[float, float] = (0.1, 10.0)
    lr: tuple[float, float] = (0.005, 0.2)
    weight_lr: tuple[float, float] = (1e-4, 1e-2)
    iters: tuple[int, int] = (50, 400)
    ste_width: tuple[float, float] = (0.25, 4.0)
    score: tuple[str, ...] = SCORES

    def __post_init__(self) -> None:
        for name in ("lam", "lr", "weight_lr", "ste_width"):
            lo, hi = _pair(getattr(self, name), name, float)
            if not (0 < lo <= hi) or not math.isfinite(hi):
                raise UserError(
                    f"search range of {name} must be 0 < LO <= HI (log scale), got {lo}:{hi}"
                )
            object.__setattr__(self, name, (lo, hi))
        lo, hi = _pair(self.iters, "iters", _as_int)
        if not 1 <= lo <= hi:
            raise UserError(f"search range of iters must be 1 <= LO <= HI, got {lo}:{hi}")
        object.__setattr__(self, "iters", (lo, hi))
        scores = self.score.split(",") if isinstance(self.score, str) else self.score
        scores = tuple(dict.fromkeys(str(s).strip() for s in scores if str(s).strip()))
        bad = [s for s in scores if s not in SCORES]
        if bad or not scores:
            raise UserError(
                f"scores to search must be among {', '.join(SCORES)}, got {','.join(scores) or 'none'}"
            )
        object.__setattr__(self, "score", scores)

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | Sequence[str] | None) -> SearchSpace:
        """A space from ``{"lam": "0.5:2", "score": "wanda"}`` or ``["lam=0.5:2", ...]``;
        names left out keep their default range."""
        if not overrides:
            return cls()
        if not isinstance(overrides, Mapping):
            items = {}
            for item in overrides:
                key, eq, value = str(item).partition("=")
                if not eq or not key.strip():
                    raise UserError(
                        f"--space takes NAME=LO:HI (e.g. lam=0.1:10, score=wanda), got {item!r}"
                    )
                items[key.strip().replace("-", "_")] = value.strip()
            overrides = items
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise UserError(f"cannot search {unknown[0]!r}: the sweep searches {', '.join(known)}")
        return cls(**dict(overrides))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def suggest(self, trial: Any) -> tuple[dict[str, Any], str]:
        """The fcpts settings and the score that ``trial`` tries."""
        settings = {
            "lam": trial.suggest_float("lam", *self.lam, log=True),
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "weight_lr": trial.suggest_float("weight_lr", *self.weight_lr, log=True),
            "iters": trial.suggest_int("iters", *self.iters),
            "ste_width": trial.suggest_float("ste_width", *self.ste_width, log=True),
        }
        score = trial.suggest_categorical("score", list(self.score))
        return settings, score

    def baseline(self) -> tuple[dict[str, Any], list[str]]:
        """The library defaults as trial params, each clipped into the searched range, and
        the names that had to be clipped."""
        from .alloc.fcpts import FCPTS

        defaults = FCPTS.Config()
        params: dict[str, Any] = {}
        clipped = []
        for name in SWEPT:
            lo, hi = getattr(self, name)
            value = getattr(defaults, name)
            inside = min(hi, max(lo, value))
            if inside != value:
                clipped.append(name)
            params[name] = inside
        score = "wanda" if "wanda" in self.score else self.score[0]
        if score != "wanda":
            clipped.append("score")
        params["score"] = score
        return params, clipped


def _as_int(value: Any) -> int:
    f = float(value)
    if f != int(f):
        raise ValueError(value)
    return int(f)


# ------------------------------------------------------------------------ study config


@dataclass(frozen=True)
class SweepSpec:
    """What a study optimises: stored in the study, so every worker runs the same thing."""

    model: str
    target: float
    data: str | None = None
    weights: str | None = None
    task: str = "auto"
    image_size: int | None = None
    image_mode: str = "RGB"
    seed: int = 0
    calibration_samples: int | None = None
    batch_size: int | None = None
    validation_samples: int | None = None
    eval_batch_size: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=lambda: SearchSpace().to_dict())
    report_every: int = 20

    def __post_init__(self) -> None:
        from .landing import check_target

        object.__setattr__(self, "target", float(check_target(self.target)))
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("no model source given: pass --model (e.g. demo:digits-cnn)")
        clash = sorted(set(self.settings) & set(SWEPT))
        if clash:
            raise UserError(
                f"setting {clash[0]!r} is searched by the sweep: fix it with --space "
                f"{clash[0]}=X:X instead of --set"
            )
        if "seed" in self.settings:
            raise UserError("give the seed with --seed, not as an allocator setting")
        if int(self.report_every) < 1:
            raise UserError(f"--report-every must be >= 1, got {self.report_every}")
        for name in ("calibration_samples", "batch_size", "validation_samples", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise UserError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value}"
                )
        SearchSpace.from_overrides(self.space)  # validates

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_overrides(self.space)

    def sources(self):
        from .sources import Sources

        return Sources(
            model=self.model,
            data=self.data,
            weights=self.weights,
            task=self.task,
            image_size=self.image_size,
            image_mode=self.image_mode,
        )

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_study_name(model: str, target: float) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(model)).strip("-")[:60] or "model"
    return f"fcpts-{slug}-t{float(target):g}"


# ----------------------------------------------------------------------------- storage


def redact_url(url: str) -> str:
    """``url`` with the password replaced by ``***``."""
    parts = urlsplit(str(url))
    if parts.password is None:
        return str(url)
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def storage_url(storage: str | os.PathLike | None, out_dir: str | os.PathLike | None) -> str:
    """A SQLAlchemy URL for ``storage``: given as a URL, as a path to a SQLite file, or
    None for ``<out_dir>/study.db``."""
    if storage is None or not str(storage).strip():
        if out_dir is None:
            raise UserError(
                "give --storage (a SQLAlchemy URL) or --out (the study goes to OUT/study.db)"
            )
        path = Path(out_dir).expanduser().absolute() / STUDY_DB
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    text = str(storage).strip()
    if "://" not in text:
        path = Path(text).expanduser().absolute()
        if path.is_dir():
            path = path / STUDY_DB
        if not path.parent.is_dir():
            raise UserError(f"folder {path.parent} for the study database does not exist")
        return f"sqlite:///{path}"
    scheme = text.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in RDB_SCHEMES:
        raise UserError(
            f"--storage {redact_url(text)} is not a database URL: give a SQLAlchemy URL such as "
            "postgresql+psycopg2://user:password@host/db or sqlite:///path/study.db"
        )
    return text


@contextlib.contextmanager
def _quiet_optuna() -> Iterator[None]:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def open_storage(
    url: str, heartbeat_interval: int = DEFAULT_HEARTBEAT, grace_period: int = DEFAULT_GRACE
):
    """An Optuna RDBStorage with heartbeats (a killed trial turns FAIL after
    ``grace_period`` seconds without one) and one retry of each such trial."""
    import inspect

    import optuna

    heartbeat_interval = int(heartbeat_interval)
    grace_period = int(grace_period)
    if heartbeat_interval < 1 or grace_period < 1:
        raise UserError("heartbeat interval and grace period must be >= 1 second")
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
    else:
        engine_kwargs["pool_pre_ping"] = True
    kwargs: dict[str, Any] = {
        "engine_kwargs": engine_kwargs,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
    }
    params = inspect.signature(optuna.storages.RDBStorage).parameters
    with _quiet_optuna():
        if "heartbeat_stale_trial_callback" in params:  # Optuna >= 4.9
            kwargs["heartbeat_stale_trial_callback"] = (
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            )
        else:
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    try:
        with _quiet_optuna():
            storage = optuna.storages.RDBStorage(url, **kwargs)
        if url.startswith("sqlite"):
            _serialize_sqlite(storage.engine)
        return storage
    except ImportError as exc:
        raise UserError(
            f"the study storage {redact_url(url)} needs a database driver that is not installed "
            f"({exc}): e.g. pip install psycopg2-binary"
        ) from None
    except Exception as exc:
        raise ServiceError(
            f"could not open the study storage {redact_url(url)}: {_first_line(exc)}; check that "
            "the database server is running and reachable and that the database exists"
        ) from None


def _serialize_sqlite(engine: Any) -> None:
    """Begin every SQLite transaction with BEGIN IMMEDIATE.

    pysqlite begins transactions lazily: a transaction that reads and then writes (how
    Optuna claims a WAITING trial: read its state, set RUNNING) takes the write lock only
    at the write, so two processes can both claim the same enqueued trial, or one gets an
    immediate "database is locked" (SQLite cannot wait out that deadlock). Taking the write
    lock at BEGIN makes transactions queue up behind the busy timeout instead (SQLAlchemy's
    documented pysqlite recipe). PostgreSQL needs none of this: Optuna locks the row.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # let SQLAlchemy emit BEGIN itself

    @event.listens_for(engine, "begin")
    def _begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners existed are dropped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact_url(text.splitlines()[0][:300])


# ------------------------------------------------------------------- data and objective


@dataclass
class _Context:
    """One process's loaded model, task and splits."""

    spec: SweepSpec
    net: Any
    task: Any
    selection: Any
    calibration: list[Any]
    validation: list[Any]
    dense_out: Any
    labels: Any
    metric: str
    device: Any
    splits: dict[str, Any]
    _norms: dict[str, Any] | None = None

    def norms(self) -> dict[str, Any]:
        if self._norms is None:
            from .scores import collect_input_norms
            from .tasks import to_device

            layers = self.selection.find(self.net)
            self._norms = collect_input_norms(
                self.net,
                layers,
                [to_device(b, self.device) for b in self.calibration],
                self.task.run,
            )
        return self._norms

    def value(self, net: Any) -> float:
        """The objective (higher is better) of ``net`` on the validation split."""
        from .metrics import mean_cosine, outputs, relative_output_mse, top1

        out = outputs(net, self.task, self.validation, self.device)
        if self.metric in ("top1", "top1_agreement"):
            return top1(out, self.labels if self.labels is not None else self.dense_out.argmax(-1))
        if self.metric == "cosine":
            return mean_cosine(out, self.dense_out)
        return -relative_output_mse(self.dense_out, out)


_CONTEXTS: dict[tuple[str, str], _Context] = {}


def _load_context(spec: SweepSpec, device: str = "auto") -> _Context:
    key = (json.dumps(spec.to_dict(), sort_keys=True), str(device))
    if key in _CONTEXTS:
        return _CONTEXTS[key]
    import torch

    from .core import resolve_device
    from .metrics import outputs
    from .sources import (
        check_fit,
        layer_view,
        resolve_data,
        resolve_model,
        resolve_task,
        sample_digests,
    )
    from .steps.common import selection_from_dict
    from .tasks import ClassifierTask, EncoderTask, to_device

    sources = spec.sources()
    model = resolve_model(sources.model, sources.weights)
    if model.scripted:
        raise UserError(
            "the fcpts method learns through the model's forward pass, which TorchScript does "
            "not allow: give module:function --weights to sweep it"
        )
    data = resolve_data(sources, model)
    task = resolve_task(sources.task, model, data)
    selection = selection_from_dict(spec.selection, base=model.selection)
    net = layer_view(model)
    selection.find(net)  # checks the patterns
    n_cal = spec.calibration_samples or model.defaults["calibration_samples"]
    bs_cal = spec.batch_size or model.defaults["calibration_batch_size"]
    n_val = spec.validation_samples or model.defaults["evaluation_samples"]
    bs_val = spec.eval_batch_size or model.defaults["evaluation_batch_size"]
    calibration = data.split("calibration", n_cal, bs_cal, spec.seed)
    validation = data.split("validation", n_val, bs_val, spec.seed)
    if not calibration or not validation:
        raise UserError(f"the calibration or validation split of {data.source} is empty")
    dev = resolve_device(device)
    net = net.to(dev).eval()
    check_fit(net, task, to_device(calibration[0], dev), data)
    dense_out = outputs(net, task, validation, dev)
    labels = None
    if isinstance(task, EncoderTask):
        metric = "cosine"
    elif isinstance(task, ClassifierTask):
        metric = "top1"
        ys = [b["y"] for b in validation if isinstance(b, Mapping) and "y" in b]
        if len(ys) == len(validation):
            labels = torch.cat(ys)
        else:
            metric = "top1_agreement"
    else:
        metric = "neg_relative_mse"
    cal_digests, val_digests = sample_digests(calibration), sample_digests(validation)
    splits = {
        "calibration": {"split": "calibration", "samples": len(cal_digests), "batch_size": bs_cal},
        "objective": {"split": "validation", "samples": len(val_digests), "batch_size": bs_val},
        "shared_samples": len(set(cal_digests) & set(val_digests)),
        "data": data.source,
        "seed": spec.seed,
    }
    if splits["shared_samples"]:
        _say(
            f"warning: {splits['shared_samples']} validation samples equal calibration samples "
            "(the data set holds duplicates)"
        )
    ctx = _Context(
        spec=spec,
        net=net,
        task=task,
        selection=selection,
        calibration=calibration,
        validation=validation,
        dense_out=dense_out,
        labels=labels,
        metric=metric,
        device=dev,
        splits=splits,
    )
    _CONTEXTS.clear()  # keep one model in memory per process
    _CONTEXTS[key] = ctx
    return ctx


def _supports_set_constraint() -> bool:
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def constraint_of(trial: Any) -> list[float]:
    """The constraint values of a finished trial (<= 0: feasible). Trials without any
    (pruned before landing) count as feasible: they are never selected anyway."""
    values = dict(getattr(trial, "constraints", None) or {})
    if not values:
        con = (getattr(trial, "system_attrs", None) or {}).get("constraints")
        if con is not None:
            values = {str(i): c for i, c in enumerate(con)}
    if not values:
        con = trial.user_attrs.get(ATTR_CONSTRAINT)
        if con is not None:
            values = {str(i): c for i, c in enumerate(con if isinstance(con, list) else [con])}
    return [float(v) for v in values.values()]


def _constraints_func(trial: Any) -> list[float]:
    """For Optuna < 5, where TPESampler reads constraints through this function."""
    con = trial.user_attrs.get(ATTR_CONSTRAINT)
    return [float(c) for c in con] if con is not None else [0.0]


def is_feasible(trial: Any) -> bool:
    return all(v <= 0.0 for v in constraint_of(trial))


def select_best(trials: Sequence[Any]) -> Any | None:
    """The best feasible COMPLETE trial with a finite value (highest value, lowest number
    on ties), or None."""
    import optuna

    candidates = [
        t
        for t in trials
        if t.state == optuna.trial.TrialState.COMPLETE
        and t.value is not None
        and math.isfinite(t.value)
        and is_feasible(t)
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda t: (t.value, -t.number))


def landing_gap(allocation: Any, target: float) -> int:
    """How many zeros the allocation is off ``round(target x prunable)``."""
    from .sparse_model import round_half_up

    return abs(allocation.zeros - round_half_up(target * allocation.prunable))


class Objective:
    """The objective of one process: allocate with the trial's settings, report the
    reconstruction loss at checkpoints, record the constraint, return the validation
    metric."""

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.spec = ctx.spec
        self.space = ctx.spec.search_space

    def __call__(self, trial: Any) -> float:
        import optuna
        import torch

        from .core import sparsify
        from .sparse_model import apply_allocation

        ctx, spec = self.ctx, self.spec
        swept, score = self.space.suggest(trial)
        settings = {**spec.settings, **swept, "seed": int(spec.seed)}
        baseline = bool(trial.user_attrs.get(ATTR_BASELINE))
        every = int(spec.report_every)
        last = int(swept["iters"])
        window: list[float] = []

        def callback(iteration: int, record: Mapping[str, float]) -> None:
            window.append(float(record["rec_loss"]))
            step = iteration + 1
            if step % every:
                return
            mean = sum(window) / len(window)
            window.clear()
            if not math.isfinite(mean):
                raise optuna.TrialPruned(f"reconstruction loss is {mean} at iteration {step}")
            trial.report(-mean, step)
            # the last checkpoint is the end of the run: scoring it costs less than pruning
            if not baseline and step < last and trial.should_prune():
                raise optuna.TrialPruned(f"pruned at iteration {step}")

        start = time.perf_counter()
        torch.manual_seed(int(spec.seed))
        allocation = sparsify(
            ctx.net,
            spec.target,
            method="fcpts",
            score=score,
            task=ctx.task,
            batches=ctx.calibration,
            selection=ctx.selection,
            settings=settings,
            input_norms=ctx.norms() if score == "wanda" else None,
            device=ctx.device,
            callback=callback,
        )
        gap = landing_gap(allocation, spec.target)
        constraint = gap / allocation.prunable
        trial.set_user_attr(ATTR_CONSTRAINT, [constraint])
        if _supports_set_constraint():
            trial.set_constraint(CONSTRAINT, constraint)
        history = allocation.history
        trial.set_user_attr("zeros", allocation.zeros)
        trial.set_user_attr("prunable", allocation.prunable)
        trial.set_user_attr("achieved_sparsity", allocation.achieved)
        trial.set_user_attr("exact", gap == 0)
        if history:
            trial.set_user_attr("learned_sparsity", float(history[-1]["global_sparsity"]))
        trial.set_user_attr("settings", settings)
        trial.set_user_attr("score", score)
        sparse = apply_allocation(ctx.net, allocation)
        value = ctx.value(sparse)
        trial.set_user_attr("seconds", round(time.perf_counter() - start, 3))
        return value if math.isfinite(value) else float("nan")


# ------------------------------------------------------------------------------ MLflow


class _Tracker:
    """MLflow for one sweep process: the parent run and one nested run per trial."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        from .tracking.connection import Store

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
        tags = {
            MLFLOW_RUN_NAME: f"sweep-{study.study_name}",
            "fcpts.sweep.study": study.study_name,
            "fcpts.sweep.storage": redact_url(storage),
        }
        run = self.store.call(
            "create the sweep run",
            self.client.create_run,
            exp,
            tags=tags,
            run_name=f"sweep-{study.study_name}",
        )
        run_id = run.info.run_id
        params = {
            "model": spec.model,
            "data": spec.data or "",
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
        return _TrialLogger(self, parent.info.experiment_id, parent_run_id)

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


class _TrialLogger:
    """Optuna callback: one nested MLflow run per trial that finished in this process."""

    _STATUS = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED"}

    def __init__(self, tracker: _Tracker, experiment_id: str, parent_run_id: str) -> None:
        self.tracker = tracker
        self.experiment_id = experiment_id
        self.parent = parent_run_id

    def __call__(self, study: Any, trial: Any) -> None:
        try:
            self._log(study, trial)
        except Exception as exc:  # never lose a sweep to a tracking hiccup
            print(
                f"[fcpts sweep] warning: trial {trial.number} was not logged to MLflow: "
                f"{_first_line(exc)}",
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


def _tracking_uri(tracking_uri: str | None) -> str | None:
    uri = tracking_uri if tracking_uri is not None else os.environ.get("MLFLOW_TRACKING_URI")
    uri = str(uri).strip() if uri else ""
    return uri or None


# ---------------------------------------------------------------- prepare, work, finish


@dataclass
class Prepared:
    study_name: str
    storage: str
    created: bool
    parent_run_id: str | None
    failed_stale: int
    running: int
    existing: int


def prepare_study(
    spec: SweepSpec,
    storage: str,
    study_name: str | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    baseline: bool = True,
    device: str = "auto",
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
) -> Prepared:
    """Create the study (or reopen it: its configuration must match ``spec``), fail the
    trials whose heartbeat went stale, enqueue the baseline into a new study, and open the
    MLflow parent run when tracking. Loads the model and data once to check them."""
    import optuna

    from .alloc import get_allocator

    study_name = study_name or default_study_name(spec.model, spec.target)
    base_params, clipped = spec.search_space.baseline()
    # unknown or invalid fixed settings fail here, not in every trial
    get_allocator("fcpts", **spec.settings, **{k: base_params[k] for k in SWEPT})
    rdb = open_storage(storage, heartbeat_interval, grace_period)
    with _quiet_optuna():
        try:
            existing = optuna.load_study(study_name=study_name, storage=rdb)
        except KeyError:
            existing = None
    if existing is not None:  # a cheap check before loading the model
        if existing.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(
                f"study {study_name} is not an fcpts sweep (it minimises): give another --study"
            )
        _check_same(existing, spec, storage)
    ctx = _load_context(spec, device)  # checks model, data and selection before any trial
    with _quiet_optuna():
        try:
            study = optuna.create_study(
                storage=rdb, study_name=study_name, direction="maximize", load_if_exists=False
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=rdb)
            created = False
    if created:
        study.set_user_attr(ATTR_SPEC, spec.to_dict())
        study.set_user_attr(ATTR_METRIC, ctx.metric)
        study.set_user_attr(ATTR_DENSE, ctx.value(ctx.net))
        study.set_user_attr(ATTR_SPLITS, ctx.splits)
        if baseline:
            study.enqueue_trial(
                base_params, user_attrs={ATTR_BASELINE: True, "baseline_clipped": clipped}
            )
    elif existing is None:  # created by another process since we looked
        _check_same(study, spec, storage)
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    with _quiet_optuna():
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    failed = sum(1 for t in trials if t.number in before and t.state.name == "FAIL")
    running = sum(1 for t in trials if t.state.name == "RUNNING")
    if failed:
        _say(
            f"marked {failed} stale trial(s) FAIL (left RUNNING by a stopped worker); each is "
            "re-queued once with the same parameters"
        )
    if running:
        _say(
            f"{running} trial(s) of study {study_name} are RUNNING: another worker's, or a killed "
            f"worker's whose heartbeat is not yet {grace_period} s old (they turn FAIL then)"
        )
    parent = None
    uri = _tracking_uri(tracking_uri)
    if uri:
        parent = _Tracker(uri, experiment).parent_run(study, spec, storage, created)
    return Prepared(
        study_name=study_name,
        storage=storage,
        created=created,
        parent_run_id=parent,
        failed_stale=failed,
        running=running,
        existing=len(trials),
    )


def _check_same(study: Any, spec: SweepSpec, storage: str) -> None:
    stored = study.user_attrs.get(ATTR_SPEC)
    if stored is None:
        raise UserError(
            f"study {study.study_name} in {redact_url(storage)} was not made by fcpts sweep "
            "(or is still being created): give another --study"
        )
    mine = spec.to_dict()
    for key in mine:
        if stored.get(key) != mine[key]:
            raise UserError(
                f"study {study.study_name} in {redact_url(storage)} was made with {key}="
                f"{json.dumps(stored.get(key))}, not {json.dumps(mine[key])}: rerun with the same "
                "options to resume it, or give another --study"
            )


def load_spec(storage: str, study_name: str) -> SweepSpec:
    """The configuration stored in a study made by :func:`prepare_study`."""
    import optuna

    rdb = open_storage(storage)
    try:
        with _quiet_optuna():
            study = optuna.load_study(study_name=study_name, storage=rdb)
    except KeyError:
        raise UserError(
            f"no study {study_name!r} in {redact_url(storage)}: prepare it first (fcpts sweep)"
        ) from None
    spec = study.user_attrs.get(ATTR_SPEC)
    if spec is None:
        raise UserError(f"study {study_name} was not made by fcpts sweep")
    return SweepSpec.from_dict(spec)


def _sampler(seed: int, worker: int, existing: int, trials: int):
    import optuna

    n_startup = max(2, min(10, trials // 3 if trials else 10))
    kwargs: dict[str, Any] = {
        "seed": (int(seed) * 1_000_003 + worker * 7919 + existing * 104_729) % (2**31),
        "n_startup_trials": n_startup,
        "multivariate": True,
    }
    if not _supports_set_constraint():
        kwargs["constraints_func"] = _constraints_func
    with _quiet_optuna():
        return optuna.samplers.TPESampler(**kwargs)


def run_worker(
    storage: str,
    study_name: str,
    n_trials: int,
    *,
    worker: int = 0,
    device: str = "auto",
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    threads: int | None = None,
    pruner_startup_trials: int = 3,
    pruner_warmup_steps: int | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
    expected_trials: int | None = None,
) -> int:
    """Run ``n_trials`` trials of a prepared study in this process; returns how many ran.

    Any number of workers, on any machines that reach the storage, may run at once.
    ``pruner_warmup_steps`` defaults to two reporting windows.
    """

    if n_trials <= 0:
        return 0
    with torch_threads(threads):
        return _run_worker(
            storage,
            study_name,
            n_trials,
            worker=worker,
            device=device,
            tracking_uri=tracking_uri,
            experiment=experiment,
            pruner_startup_trials=pruner_startup_trials,
            pruner_warmup_steps=pruner_warmup_steps,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            expected_trials=expected_trials,
        )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch threads for the duration (None: leave as is)."""
    if not threads:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run_worker(
    storage: str,
    study_name: str,
    n_trials: int,
    *,
    worker: int,
    device: str,
    tracking_uri: str | None,
    experiment: str,
    pruner_startup_trials: int,
    pruner_warmup_steps: int | None,
    heartbeat_interval: int,
    grace_period: int,
    expected_trials: int | None,
) -> int:
    import optuna

    rdb = open_storage(storage, heartbeat_interval, grace_period)
    with _quiet_optuna():
        try:
            probe = optuna.load_study(study_name=study_name, storage=rdb)
        except KeyError:
            raise UserError(
                f"no study {study_name!r} in {redact_url(storage)}: prepare it first"
            ) from None
    stored = probe.user_attrs.get(ATTR_SPEC)
    if stored is None:
        raise UserError(f"study {study_name} was not made by fcpts sweep")
    spec = SweepSpec.from_dict(stored)
    ctx = _load_context(spec, device)
    existing = len(probe.get_trials(deepcopy=False))
    warmup = 2 * spec.report_every if pruner_warmup_steps is None else int(pruner_warmup_steps)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=int(pruner_startup_trials),
        n_warmup_steps=warmup,
        interval_steps=1,
    )
    with _quiet_optuna():
        study = optuna.load_study(
            study_name=study_name,
            storage=rdb,
            sampler=_sampler(spec.seed, worker, existing, expected_trials or n_trials),
            pruner=pruner,
        )
    callbacks = []
    uri = _tracking_uri(tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT_RUN)
    if uri and parent:
        callbacks.append(_Tracker(uri, experiment).trial_callback(parent))
    with _quiet_optuna():
        study.optimize(Objective(ctx), n_trials=int(n_trials), callbacks=callbacks)
    return int(n_trials)


def _counts(trials: Sequence[Any]) -> dict[str, int]:
    counts = {
        "total": len(trials),
        "complete": 0,
        "pruned": 0,
        "fail": 0,
        "running": 0,
        "waiting": 0,
    }
    for t in trials:
        key = t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    counts["infeasible"] = sum(
        1 for t in trials if t.state.name == "COMPLETE" and not is_feasible(t)
    )
    return counts


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _trial_record(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": _finite(t.value),
        "feasible": is_feasible(t),
        "constraint": constraint_of(t),
        "baseline": bool(t.user_attrs.get(ATTR_BASELINE)),
        "params": dict(t.params),
        "intermediate": {str(k): _finite(v) for k, v in sorted(t.intermediate_values.items())},
        "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "settings"},
        "retry_of": (t.system_attrs or {}).get("failed_trial"),
    }


def _settings_of(t: Any, spec: SweepSpec) -> dict[str, Any]:
    settings = t.user_attrs.get("settings")
    if settings is None:  # trials made before this attribute existed
        settings = {
            **spec.settings,
            **{k: t.params[k] for k in SWEPT if k in t.params},
            "seed": spec.seed,
        }
    return dict(settings)


def finish_sweep(
    storage: str,
    study_name: str,
    out_dir: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    plot: bool = True,
    ok: bool = True,
) -> dict[str, Any]:
    """Select the best feasible complete trial of the whole study and write
    ``best.json``, ``allocate.json``, ``trials.json`` and ``study.png`` to ``out_dir``; tag
    and close the MLflow parent run. Raises FcptsError when no trial qualifies."""
    import optuna

    from .steps.common import write_json

    rdb = open_storage(storage)
    with _quiet_optuna():
        study = optuna.load_study(study_name=study_name, storage=rdb)
    stored = study.user_attrs.get(ATTR_SPEC)
    if stored is None:
        raise UserError(f"study {study_name} was not made by fcpts sweep")
    spec = SweepSpec.from_dict(stored)
    trials = study.get_trials(deepcopy=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = _counts(trials)
    best = select_best(trials)
    base_trials = [t for t in trials if t.user_attrs.get(ATTR_BASELINE)]
    base_done = select_best(base_trials) or next(
        (t for t in base_trials if t.state.name == "COMPLETE"), None
    )
    baseline: dict[str, Any] = {"value": None, "trial": None}
    if base_done is not None:
        baseline = {
            "value": _finite(base_done.value),
            "trial": base_done.number,
            "score": base_done.params.get("score"),
            "params": _settings_of(base_done, spec),
            "feasible": is_feasible(base_done),
            "clipped_to_space": base_done.user_attrs.get("baseline_clipped", []),
            "description": "the fcpts library defaults (score wanda), with settings outside the "
            "searched ranges clipped into them, evaluated like every trial",
        }
    elif base_trials:
        baseline["note"] = f"the baseline trial ended {base_trials[-1].state.name}"
    else:
        baseline["note"] = "no baseline trial in this study"
    metric = study.user_attrs.get(ATTR_METRIC, "")
    dense = study.user_attrs.get(ATTR_DENSE)
    result: dict[str, Any] = {
        "format": FORMAT,
        "study": study_name,
        "storage": redact_url(storage),
        "model": spec.model,
        "data": spec.data,
        "target": spec.target,
        "method": "fcpts",
        "seed": spec.seed,
        "metric": metric,
        "higher_is_better": True,
        "objective_split": "validation",
        "splits": study.user_attrs.get(ATTR_SPLITS),
        "dense_value": _finite(dense),
        "value": None,
        "trial": None,
        "score": None,
        "params": None,
        "baseline": baseline,
        "improvement_over_baseline": None,
        "trials": counts,
        "search_space": spec.space,
        "fixed_settings": spec.settings,
        "files": {
            "trials": TRIALS_FILE,
            "plot": PLOT_FILE if plot else None,
            "allocate_config": ALLOCATE_FILE,
        },
    }
    if best is not None:
        result.update(
            value=best.value,
            trial=best.number,
            score=best.params["score"],
            params=_settings_of(best, spec),
            achieved_sparsity=best.user_attrs.get("achieved_sparsity"),
            exact=best.user_attrs.get("exact"),
            seconds=best.user_attrs.get("seconds"),
        )
        if baseline.get("value") is not None:
            result["improvement_over_baseline"] = best.value - baseline["value"]
    write_json(
        out / TRIALS_FILE, {"study": study_name, "trials": [_trial_record(t) for t in trials]}
    )
    files = [out / TRIALS_FILE]
    if plot:
        try:
            plot_study(trials, out / PLOT_FILE, baseline.get("value"), metric, best)
            files.append(out / PLOT_FILE)
        except Exception as exc:  # a plot never costs the sweep's result
            _say(f"warning: could not draw {PLOT_FILE}: {_first_line(exc)}")
            result["files"]["plot"] = None
    uri = _tracking_uri(tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT_RUN)
    if uri and parent:
        result["mlflow"] = {"tracking_uri": redact_url(uri), "parent_run_id": parent}
    if best is not None:
        write_json(out / ALLOCATE_FILE, allocate_config(result, spec))
        files.append(out / ALLOCATE_FILE)
        write_json(out / BEST_FILE, result)
        files.insert(0, out / BEST_FILE)
    if uri and parent:
        _Tracker(uri, experiment).finish(parent, result, files, ok and best is not None)
    if best is None:
        raise FcptsError(
            f"study {study_name} has no feasible complete trial yet ({counts['complete']} complete, "
            f"{counts['infeasible']} of them off target, {counts['pruned']} pruned, "
            f"{counts['fail']} failed): run more trials"
        )
    return result


def allocate_config(best: Mapping[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """A ``--config`` file for ``fcpts allocate`` that reproduces the best trial."""
    config: dict[str, Any] = {
        "model": spec.model,
        "target": spec.target,
        "method": "fcpts",
        "score": best["score"],
        "seed": spec.seed,
        "settings": best["params"],
    }
    for key in ("data", "weights", "image_size", "calibration_samples", "batch_size"):
        value = getattr(spec, key)
        if value is not None:
            config[key] = value
    if spec.task != "auto":
        config["task"] = spec.task
    if spec.image_mode != "RGB":
        config["image_mode"] = spec.image_mode
    sel = spec.selection or {}
    for key in ("include", "exclude", "keep_dense"):
        if sel.get(key):
            config[key] = list(sel[key]) if not isinstance(sel[key], str) else [sel[key]]
    for key in ("min_sparsity", "max_sparsity"):
        if sel.get(key) is not None:
            config[key] = sel[key]
    if sel.get("bounds"):
        config["bounds"] = [f"{k}={lo}:{hi}" for k, (lo, hi) in dict(sel["bounds"]).items()]
    return config


def load_best(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``best.json`` (or the folder holding it)."""
    from .steps.common import read_json

    p = Path(path)
    if p.is_dir():
        p = p / BEST_FILE
    data = read_json(p, "sweep result", "point to the --out folder of `fcpts sweep`")
    if data.get("format") != FORMAT or not isinstance(data.get("params"), dict):
        raise UserError(f"{p} is not an fcpts sweep result (format {data.get('format')!r})")
    return data


def best_settings(best: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(score, settings)`` of a sweep result, for ``sparsify``/``allocate``."""
    return str(best["score"]), dict(best["params"])


# -------------------------------------------------------------------------------- plot


def plot_study(
    trials: Sequence[Any],
    path: str | os.PathLike,
    baseline: float | None = None,
    metric: str = "",
    best: Any | None = None,
) -> Path:
    """Optimisation history (left) and parameter importances (right) as a PNG. The
    importances need at least two feasible complete trials; with fewer, the panel says so."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    complete = [
        t
        for t in trials
        if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)
    ]
    feasible = [t for t in complete if is_feasible(t)]
    infeasible = [t for t in complete if not is_feasible(t)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if feasible:
        ax.scatter(
            [t.number for t in feasible],
            [t.value for t in feasible],
            label="feasible",
            color="tab:blue",
            zorder=3,
        )
        running, xs, ys = -math.inf, [], []
        for t in sorted(feasible, key=lambda t: t.number):
            running = max(running, t.value)
            xs.append(t.number)
            ys.append(running)
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    if infeasible:
        ax.scatter(
            [t.number for t in infeasible],
            [t.value for t in infeasible],
            marker="x",
            color="tab:red",
            label="off target (infeasible)",
            zorder=3,
        )
    pruned = [t.number for t in trials if t.state.name == "PRUNED"]
    if pruned:
        for n in pruned:
            ax.axvline(n, color="0.85", lw=1, zorder=1)
        ax.plot([], [], color="0.85", label="pruned")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="tab:green", label="baseline (defaults)")
    if best is not None:
        ax.scatter(
            [best.number],
            [best.value],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="best",
            zorder=4,
        )
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}".strip())
    ax.set_title("optimisation history")
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    importances = _importances(feasible)
    if importances:
        names = list(importances)[::-1]
        ax2.barh(names, [importances[n] for n in names], color="tab:blue")
        ax2.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax2.text(
            0.5,
            0.5,
            f"parameter importances need >= 2 feasible complete trials\n(have {len(feasible)})",
            ha="center",
            va="center",
            transform=ax2.transAxes,
        )
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("parameter importances")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _importances(trials: Sequence[Any]) -> dict[str, float]:
    if len(trials) < 2:
        return {}
    import optuna

    try:
        with _quiet_optuna():
            study = optuna.create_study(direction="maximize")
            study.add_trials(
                [
                    optuna.trial.create_trial(
                        params=t.params, distributions=t.distributions, value=t.value
                    )
                    for t in trials
                ]
            )
            return dict(optuna.importance.get_param_importances(study))
    except Exception:
        return {}


# ----------------------------------------------------------------------------- sweep


@dataclass
class SweepResult:
    path: Path
    best: dict[str, Any]
    study_name: str
    storage: str

    @property
    def score(self) -> str:
        return self.best["score"]

    @property
    def params(self) -> dict[str, Any]:
        return self.best["params"]


def trial_shares(trials: int, workers: int) -> list[int]:
    """``trials`` split over ``workers`` as evenly as possible."""
    return [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]


def _worker_main(kwargs: dict[str, Any]) -> None:
    """Entry point of a spawned worker process."""
    try:
        run_worker(**kwargs)
    except UserError as exc:
        print(f"fcpts sweep worker {kwargs.get('worker')}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_sweep(
    model_src: str,
    data_src: str | None = None,
    target: float = 0.5,
    trials: int = 20,
    storage: str | os.PathLike | None = None,
    study_name: str | None = None,
    workers: int = 1,
    out_dir: str | os.PathLike = "sweep",
    seed: int = 0,
    tracking_uri: str | None = None,
    *,
    weights: str | None = None,
    task: str = "auto",
    image_size: int | None = None,
    image_mode: str = "RGB",
    space: SearchSpace | Mapping[str, Any] | Sequence[str] | None = None,
    settings: Mapping[str, Any] | None = None,
    selection: Mapping[str, Any] | None = None,
    calibration_samples: int | None = None,
    batch_size: int | None = None,
    validation_samples: int | None = None,
    eval_batch_size: int | None = None,
    report_every: int = 20,
    pruner_startup_trials: int = 3,
    pruner_warmup_steps: int | None = None,
    baseline: bool = True,
    device: str = "auto",
    threads: int | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
    plot: bool = True,
) -> SweepResult:
    """Run ``trials`` more trials of the study (created on first use, resumed after) with
    ``workers`` processes, then write ``out_dir/best.json`` for the whole study.

    ``storage``: None for ``out_dir/study.db`` (SQLite), a path to a SQLite file, or a
    SQLAlchemy URL; ``workers > 1`` spawns processes that share the study through it
    (SQLite suits a few local workers; use PostgreSQL across machines). ``space``
    overrides search ranges (``{"iters": "20:30"}``); ``settings`` fixes other fcpts
    settings. ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``; none: no MLflow).
    """
    trials = int(trials)
    workers = int(workers)
    if trials < 0:
        raise UserError(f"--trials must be >= 0, got {trials}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    if not isinstance(space, SearchSpace):
        space = SearchSpace.from_overrides(space)
    spec = SweepSpec(
        model=model_src,
        target=target,
        data=data_src or None,
        weights=weights or None,
        task=task,
        image_size=image_size or None,
        image_mode=image_mode,
        seed=int(seed),
        calibration_samples=calibration_samples or None,
        batch_size=batch_size or None,
        validation_samples=validation_samples or None,
        eval_batch_size=eval_batch_size or None,
        selection=dict(selection or {}),
        settings=dict(settings or {}),
        space=space.to_dict(),
        report_every=int(report_every),
    )
    url = storage_url(storage, out_dir)
    uri = _tracking_uri(tracking_uri)
    with torch_threads(threads):
        prepared = prepare_study(
            spec,
            url,
            study_name,
            tracking_uri=uri or "",
            experiment=experiment,
            baseline=baseline,
            device=device,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )
    common = {
        "storage": url,
        "study_name": prepared.study_name,
        "device": device,
        "tracking_uri": uri or "",
        "experiment": experiment,
        "pruner_startup_trials": pruner_startup_trials,
        "pruner_warmup_steps": pruner_warmup_steps,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "expected_trials": trials,
    }
    ok = False
    try:
        if workers == 1:
            with torch_threads(threads):
                run_worker(n_trials=trials, worker=0, **common)
        else:
            _run_processes(common, trial_shares(trials, workers), threads)
        ok = True
    finally:
        if not ok and uri and prepared.parent_run_id:
            with contextlib.suppress(Exception):
                tracker = _Tracker(uri, experiment)
                tracker.store.call(
                    "close the sweep run",
                    tracker.client.set_terminated,
                    prepared.parent_run_id,
                    "FAILED",
                )
    best = finish_sweep(
        url, prepared.study_name, out_dir, tracking_uri=uri or "", experiment=experiment, plot=plot
    )
    return SweepResult(
        path=Path(out_dir) / BEST_FILE, best=best, study_name=prepared.study_name, storage=url
    )


def _run_processes(common: dict[str, Any], shares: list[int], threads: int | None) -> None:
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // len(shares))
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i, n in enumerate(shares):
        if n <= 0:
            continue
        kwargs = dict(common, n_trials=n, worker=i, threads=threads)
        p = ctx.Process(target=_worker_main, args=(kwargs,), name=f"fcpts-sweep-worker-{i}")
        p.start()
        procs.append((i, p))
    failed = []
    try:
        for i, p in procs:
            p.join()
            if p.exitcode != 0:
                failed.append((i, p.exitcode))
    except BaseException:
        for _, p in procs:
            if p.is_alive():
                p.terminate()
        for _, p in procs:
            p.join(timeout=10)
        raise
    if failed:
        i, code = failed[0]
        error = UserError if code == 2 else FcptsError
        raise error(
            f"sweep worker {i} failed (exit code {code}; its error is printed above); the "
            "study keeps every finished trial: rerun to resume"
        )


def _say(message: str) -> None:
    print(f"[fcpts sweep] {message}", file=sys.stderr, flush=True)
