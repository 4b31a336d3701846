"""The study storage: a SQLite file by default or any SQLAlchemy URL, opened as an Optuna
RDBStorage with heartbeats; passwords never appear in messages."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ServiceError, UserError
from ..tracking.firstuse import first_use
from ..tracking.redaction import redact as redact_url
from .common import ATTR_SPEC, DEFAULT_GRACE, DEFAULT_HEARTBEAT, STUDY_DB, quiet_optuna
from .space import SweepSpec

RDB_SCHEMES = ("sqlite", "postgresql", "postgres", "mysql", "mariadb", "oracle", "mssql")


STORAGE_ENV = "FCPTS_OPTUNA_STORAGE"


def shared_storage(storage: str | None, environ: dict | None = None) -> str:
    """The study storage that pipeline workers share: ``storage`` when given, else
    ``$FCPTS_OPTUNA_STORAGE`` (on a cluster, from the Kubernetes secret fcpts-optuna-db, so
    the password never becomes a pipeline parameter)."""
    env = os.environ if environ is None else environ
    text = (storage or "").strip() or env.get(STORAGE_ENV, "").strip()
    if "://" not in text:
        raise UserError(
            "the sweep pipeline needs a study database that every worker reaches: set the "
            f"storage parameter or {STORAGE_ENV} (Kubernetes secret fcpts-optuna-db) to a URL "
            "such as postgresql+psycopg2://user:password@host/db (sqlite:///path on one machine)"
        )
    return storage_url(text, None)


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
    with quiet_optuna():
        if "heartbeat_stale_trial_callback" in params:  # Optuna >= 4.9
            kwargs["heartbeat_stale_trial_callback"] = (
                optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1)
            )
        else:
            kwargs["failed_trial_callback"] = optuna.storages.RetryFailedTrialCallback(max_retry=1)
    try:
        with quiet_optuna(), first_use(url):  # a new SQLite study: one process makes the tables
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
        hint = (
            "check that the database file's folder is writable and that no other process keeps "
            "it locked"
            if url.startswith("sqlite")
            else "check that the database server is running and reachable and that the "
            "database exists"
        )
        raise ServiceError(
            f"could not open the study storage {redact_url(url)}: {first_line(exc)}; {hint}"
        ) from None


def load_sweep_study(rdb: Any, storage: str, study_name: str) -> tuple[Any, SweepSpec]:
    """The study ``study_name`` in the opened storage ``rdb`` (at ``storage``) and the
    configuration that :func:`~fcpts.sweep.prepare_study` stored in it."""
    import optuna

    try:
        with quiet_optuna():
            study = optuna.load_study(study_name=study_name, storage=rdb)
    except KeyError:
        raise UserError(
            f"no study {study_name!r} in {redact_url(storage)}: prepare it first (fcpts sweep)"
        ) from None
    stored = study.user_attrs.get(ATTR_SPEC)
    if stored is None:
        raise UserError(f"study {study_name} was not made by fcpts sweep")
    return study, SweepSpec.from_dict(stored)


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


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return redact_url(text.splitlines()[0][:300])
