"""One MLflow tracking store: where it is, how its credentials travel, how failures read.

Where: :func:`resolve_tracking_uri` takes an explicit URI, else ``$MLFLOW_TRACKING_URI``,
else the embedded default ``sqlite:///<root>/mlflow.db`` (``root`` defaults to
``./mlruns``) with artifacts in ``<root>/artifacts``: no server to start. Several processes
may open a new embedded store at once (:mod:`fcpts.tracking.firstuse`).

Credentials: a password in the URI (``http://user:password@host``) is moved into the
environment variables MLflow reads (:func:`~fcpts.tracking.redaction.export_credentials`)
before the client is made, so MLflow's own lines (``View run ... at http://host/...``), the
store's ``uri`` and everything passed on from it carry none. :func:`redact` removes them
from any text.

Retries: :mod:`fcpts.tracking.retry` (MLflow's own for HTTP stores, fcpts's for databases).
When they are spent a call raises :class:`~fcpts.errors.ServiceError` naming the store
(credentials removed) and what to do, in one line.

Importing ``fcpts.tracking`` also sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless set
(read when mlflow is first imported): fcpts talks to the tracking store only.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException

from ..errors import ServiceError, UserError
from .firstuse import first_use, sqlite_path
from .names import DEFAULT_EXPERIMENT
from .redaction import export_credentials, redact
from .retry import RetryPolicy, http_attempts, http_retries, is_transient, short_cause

T = TypeVar("T")

DEFAULT_ROOT = "mlruns"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"

# ------------------------------------------------------------------------------- where


def default_tracking_uri(root: str | os.PathLike = DEFAULT_ROOT) -> str:
    """``sqlite:///<absolute root>/mlflow.db``: the embedded store."""
    return f"sqlite:///{Path(root).expanduser().absolute() / 'mlflow.db'}"


TRACKING_SCHEMES = ("http", "https", "sqlite", "postgresql", "mysql", "mssql", "file", "databricks")


def resolve_tracking_uri(uri: str | None = None, root: str | os.PathLike = DEFAULT_ROOT) -> str:
    """The explicit ``uri``, else ``$MLFLOW_TRACKING_URI``, else :func:`default_tracking_uri`.

    A bare path (no scheme) means an embedded store in that folder.
    """
    uri = uri or os.environ.get(ENV_TRACKING_URI) or default_tracking_uri(root)
    uri = str(uri).strip()
    if "://" not in uri and not uri.startswith("databricks"):
        uri = default_tracking_uri(uri)
    scheme = urlsplit(uri).scheme.split("+", 1)[0].lower()
    if scheme not in TRACKING_SCHEMES and not uri.startswith("databricks"):
        raise UserError(
            f"tracking URI {redact(uri)} has the scheme {scheme!r}, which MLflow cannot store "
            "runs in: give http(s)://host:port of an MLflow server, a database URL "
            "(sqlite:///path/mlflow.db, postgresql+psycopg2://...), or a folder"
        )
    return uri


def is_http(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def embedded_artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``file://<folder of the database>/artifacts``; else None (the
    server or the experiment decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.absolute().parent / "artifacts").as_uri()


# ------------------------------------------------------------------------------- store


def _error_code(exc: BaseException) -> str | None:
    return exc.error_code if isinstance(exc, MlflowException) else None


_FLUENT_LOCK = threading.RLock()
_FLUENT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)


class Store:
    """An :class:`mlflow.MlflowClient` for one tracking URI (also the registry URI), with
    the retries of :mod:`fcpts.tracking.retry` and fcpts's error messages around every
    call. ``uri`` is the URI without credentials (they went to the environment)."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        root: str | os.PathLike = DEFAULT_ROOT,
    ) -> None:
        self.uri = export_credentials(resolve_tracking_uri(tracking_uri, root))
        self.safe_uri = redact(self.uri)
        self.retry = retry
        if sqlite_path(self.uri) is None:
            self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            return
        with first_use(self.uri):  # the first process creates the tables, alone
            self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
            self.check()
            self.call(
                "reach the model registry", self.client.search_registered_models, max_results=1
            )

    # -- calls

    def call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        passthrough: Iterable[str] = (),
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)``, retried while the store is unreachable (by MLflow for an
        HTTP store, by this loop for a database).

        ``what`` completes "could not ..." in the error message. MlflowExceptions whose
        error code is in ``passthrough`` (e.g. ``RESOURCE_ALREADY_EXISTS``) are re-raised
        as they are for the caller to handle; any other failure becomes a ServiceError.
        """
        passthrough = set(passthrough)
        http = is_http(self.uri)
        if http:
            attempts = self.retry.attempts if self.retry else http_attempts()
            delays: Iterator[float] = iter(())
        else:
            delays = (self.retry or RetryPolicy.from_env()).delays()
            attempts = 0
        start = time.monotonic()
        while True:
            attempts += 0 if http else 1
            try:
                with http_retries(self.retry if http else None):
                    return fn(*args, **kwargs)
            except Exception as exc:
                if _error_code(exc) in passthrough:
                    raise
                if not is_transient(exc):
                    if isinstance(exc, MlflowException):
                        raise ServiceError(
                            f"MLflow at {self.safe_uri} refused to {what}: "
                            f"{redact(exc.message).splitlines()[0][:500]}"
                        ) from None
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise ServiceError(
                        self.unreachable_message(what, attempts, time.monotonic() - start, exc)
                    ) from None
                time.sleep(delay)

    def unreachable_message(
        self, what: str, attempts: int, seconds: float, exc: BaseException
    ) -> str:
        cause = short_cause(redact(getattr(exc, "message", None) or exc))
        if is_http(self.uri):
            hint = (
                "check that the MLflow server is running and reachable (e.g. `mlflow server "
                "--host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db`), then "
                "rerun; or point --tracking-uri / MLFLOW_TRACKING_URI at a running server, or "
                "unset it to use the embedded store ./mlruns/mlflow.db"
            )
        elif sqlite_path(self.uri) is not None:
            hint = (
                "check that the database file's folder is writable and that no other process "
                "keeps it locked, then rerun"
            )
        else:
            hint = "check that the database server is running and reachable, then rerun"
        return (
            f"could not {what}: the MLflow tracking store {self.safe_uri} did not answer after "
            f"{attempts} attempt(s) over {seconds:.1f} s ({cause}); {hint}"
        )

    def check(self) -> None:
        """Raise ServiceError unless the store answers a cheap request."""
        self.call("reach the tracking store", self.client.search_experiments, max_results=1)

    def reachable_now(self) -> None:
        """:meth:`check` with a single try (no retries): a clear one-line ServiceError at
        once when nothing answers, e.g. before a pipeline starts."""
        self.with_retry(RetryPolicy(attempts=1)).check()

    def with_retry(self, retry: RetryPolicy | None) -> Store:
        """This store (same client) with another retry policy."""
        other = copy.copy(self)
        other.retry = retry
        return other

    # -- experiments

    def experiment_id(self, name: str = DEFAULT_EXPERIMENT) -> str:
        """The id of experiment ``name``, created when missing (for the embedded store with
        its artifacts beside the database)."""
        exp = self.call(f"look up experiment {name!r}", self.client.get_experiment_by_name, name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                self.call(
                    f"restore experiment {name!r}",
                    self.client.restore_experiment,
                    exp.experiment_id,
                )
            return exp.experiment_id
        try:
            return self.call(
                f"create experiment {name!r}",
                self.client.create_experiment,
                name,
                artifact_location=embedded_artifact_location(self.uri),
                passthrough=("RESOURCE_ALREADY_EXISTS",),
            )
        except MlflowException:  # created by another process meanwhile
            exp = self.call(
                f"look up experiment {name!r}", self.client.get_experiment_by_name, name
            )
            return exp.experiment_id

    # -- mlflow's process-wide ("fluent") state, for the APIs that only read it

    @contextlib.contextmanager
    def fluent(self, experiment_id: str | None = None) -> Iterator[None]:
        """Point MLflow's process-wide tracking URI, registry URI and experiment at this
        store for the duration, then restore them exactly (module globals and environment
        variables). ``mlflow.pytorch.log_model`` and ``load_model`` read nothing else."""
        import mlflow.tracking._model_registry.utils as registry_utils
        import mlflow.tracking._tracking_service.utils as tracking_utils
        import mlflow.tracking.fluent as fluent

        with _FLUENT_LOCK:
            saved_env = {k: os.environ.get(k) for k in _FLUENT_ENV}
            saved = (
                tracking_utils._tracking_uri,
                registry_utils._registry_uri,
                fluent._active_experiment_id,
            )
            try:
                tracking_utils._tracking_uri = self.uri
                registry_utils._registry_uri = self.uri
                os.environ["MLFLOW_TRACKING_URI"] = self.uri
                os.environ["MLFLOW_REGISTRY_URI"] = self.uri
                os.environ.pop("MLFLOW_RUN_ID", None)
                if experiment_id is not None:
                    fluent._active_experiment_id = experiment_id
                    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment_id
                yield
            finally:
                (
                    tracking_utils._tracking_uri,
                    registry_utils._registry_uri,
                    fluent._active_experiment_id,
                ) = saved
                for k, v in saved_env.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
