"""One MLflow tracking store: where it is, how calls to it are retried, how failures read.

Where: :func:`resolve_tracking_uri` takes an explicit URI, else ``$MLFLOW_TRACKING_URI``,
else the embedded default ``sqlite:///<root>/mlflow.db`` (``root`` defaults to
``./mlruns``) with artifacts in ``<root>/artifacts``: no server to start.

Retries: MLflow's own HTTP client retries a refused connection for minutes (7 retries,
exponential backoff). fcpts instead runs one retry policy of its own around every call
(:class:`RetryPolicy`: 4 attempts, backoff 0.5 s, 1 s, 2 s with jitter by default;
``FCPTS_MLFLOW_ATTEMPTS`` and ``FCPTS_MLFLOW_BACKOFF`` override it), so importing
``fcpts.tracking`` sets ``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` unless the environment
already sets it.
Retried: refused or dropped connections, timeouts, HTTP 429/502/503/504, and SQLite's
"database is locked". Not retried: everything else (a 500 may have been applied already).
When the attempts are spent the call raises :class:`~fcpts.errors.ServiceError` naming the
store (credentials removed) and what to do.

Importing ``fcpts.tracking`` also sets ``MLFLOW_DISABLE_TELEMETRY=true`` unless set
(read when mlflow is first imported): fcpts talks to the tracking store only.

Credentials never reach params, tags or messages: :func:`redact` removes passwords from
URIs, signed-URL query strings and the values of secret-looking environment variables.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import mlflow
from mlflow.exceptions import MlflowException

from ..errors import ServiceError, UserError
from .names import DEFAULT_EXPERIMENT

T = TypeVar("T")

DEFAULT_ROOT = "mlruns"
ENV_TRACKING_URI = "MLFLOW_TRACKING_URI"
ENV_ATTEMPTS = "FCPTS_MLFLOW_ATTEMPTS"
ENV_BACKOFF = "FCPTS_MLFLOW_BACKOFF"

# ----------------------------------------------------------------------------- redaction

_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::[^/@\s]*)?@"
)
_SECRET_QUERY_RE = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|access_token|password|pwd|secret|key|"
    r"credential|se|sv|sp)=)[^&\s#]*"
)
_SECRET_ENV_RE = re.compile(
    r"(?i)(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE)"
)
REDACTED = "***"


def _secret_env_values() -> list[str]:
    values = [v for k, v in os.environ.items() if _SECRET_ENV_RE.search(k) and v and len(v) >= 4]
    return sorted(set(values), key=len, reverse=True)


def redact(text: Any) -> str:
    """``text`` as a string with credentials removed.

    ``scheme://user:password@host`` becomes ``scheme://user:***@host`` (a token-long
    bare user name, ``https://TOKEN@host``, becomes ``***``), secret-looking query values
    (``X-Amz-Signature=``, ``token=``, ...) become ``***``, and any value of an environment
    variable whose name looks secret (``*PASSWORD*``, ``*SECRET*``, ``*TOKEN*``,
    ``*ACCESS_KEY*``, ...) is replaced wherever it appears.
    """
    s = str(text)

    def userinfo(m: re.Match) -> str:
        had_password = ":" in m.group(0)[len(m.group("scheme")) :]
        user = m.group("user")
        if had_password:
            return f"{m.group('scheme')}{user}:{REDACTED}@"
        # a user name alone is no secret, unless it is a token (https://TOKEN@host)
        return f"{m.group('scheme')}{REDACTED}@" if len(user) >= 20 else m.group(0)

    s = _USERINFO_RE.sub(userinfo, s)
    s = _SECRET_QUERY_RE.sub(lambda m: m.group(1) + REDACTED, s)
    for value in _secret_env_values():
        if value in s:
            s = s.replace(value, REDACTED)
    return s


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


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path("/" + path.lstrip("/")) if uri.startswith("sqlite:////") else Path(path)


def embedded_artifact_location(uri: str) -> str | None:
    """For a SQLite store, ``file://<folder of the database>/artifacts``; else None (the
    server or the experiment decides)."""
    db = sqlite_path(uri)
    if db is None:
        return None
    return (db.absolute().parent / "artifacts").as_uri()


# ------------------------------------------------------------------------------ retries


# (what the low-level error says, what the user is told), first match wins
_CAUSES = (
    (("Connection refused", "NewConnectionError"), "connection refused"),
    (("Name or service not known", "nodename nor servname", "getaddrinfo"), "host name not found"),
    (("timed out", "Timeout"), "timed out"),
    (("RemoteDisconnected", "Connection reset", "Connection aborted"), "connection dropped"),
)


def short_cause(text: str) -> str:
    """A few words for a connection failure; other errors' first line, at most 300 characters."""
    for needles, cause in _CAUSES:
        if any(n in text for n in needles):
            return cause
    return text.splitlines()[0][:300] if text else "no detail"


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th retry waits ``backoff * 2**(n-1)`` seconds (at most
    ``max_delay``) plus up to 25% jitter."""

    attempts: int = 4
    backoff: float = 0.5
    max_delay: float = 8.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        def read(name: str, cast, default):
            raw = os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                return cast(raw)
            except ValueError:
                return default

        return cls(
            attempts=max(1, read(ENV_ATTEMPTS, int, cls.attempts)),
            backoff=max(0.0, read(ENV_BACKOFF, float, cls.backoff)),
        )

    def delays(self) -> Iterator[float]:
        for n in range(self.attempts - 1):
            base = min(self.max_delay, self.backoff * (2**n))
            yield base * (1 + 0.25 * random.random())


_TRANSIENT_TEXT = (
    "max retries exceeded",
    "failed to establish a new connection",
    "connection refused",
    "connection aborted",
    "connection reset",
    "remote end closed connection",
    "read timed out",
    "connect timeout",
    "timed out",
    "temporarily unavailable",
    "database is locked",
    "could not connect to server",
    "server closed the connection",
    "name or service not known",
    "connectionerror",
)
_TRANSIENT_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
_TRANSIENT_HTTP = {429, 502, 503, 504}


def is_transient(exc: BaseException) -> bool:
    """Whether exc says the store could not be reached (worth retrying)."""
    if isinstance(exc, MlflowException):
        if exc.error_code in _TRANSIENT_CODES:
            return True
        text = str(exc.message).lower()
        if any(f"status code {c}" in text or f"error code {c}" in text for c in _TRANSIENT_HTTP):
            return True
        return any(t in text for t in _TRANSIENT_TEXT)
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    name = type(exc).__name__
    module = type(exc).__module__ or ""
    if module.startswith(("requests", "urllib3")) and (
        "Connection" in name or "Timeout" in name or "Protocol" in name
    ):
        return True
    if module.startswith("sqlalchemy") and name == "OperationalError":
        return True
    return any(t in str(exc).lower() for t in ("database is locked", "connection refused"))


def _error_code(exc: BaseException) -> str | None:
    return exc.error_code if isinstance(exc, MlflowException) else None


# ------------------------------------------------------------------------------- store

_FLUENT_LOCK = threading.RLock()
_FLUENT_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
)


class Store:
    """An :class:`mlflow.MlflowClient` for one tracking URI (also the registry URI), with
    fcpts's retry policy and error messages around every call."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        *,
        retry: RetryPolicy | None = None,
        root: str | os.PathLike = DEFAULT_ROOT,
    ) -> None:
        self.uri = resolve_tracking_uri(tracking_uri, root)
        self.safe_uri = redact(self.uri)
        self.retry = retry or RetryPolicy.from_env()
        db = sqlite_path(self.uri)
        if db is not None:
            db.absolute().parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    # -- calls

    def call(
        self,
        what: str,
        fn: Callable[..., T],
        *args: Any,
        passthrough: Iterable[str] = (),
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)``, retried while the store is unreachable.

        ``what`` completes "could not ..." in the error message. MlflowExceptions whose
        error code is in ``passthrough`` (e.g. ``RESOURCE_ALREADY_EXISTS``) are re-raised
        as they are for the caller to handle; any other failure becomes a ServiceError.
        """
        passthrough = set(passthrough)
        delays = self.retry.delays()
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if _error_code(exc) in passthrough:
                    raise
                if not is_transient(exc):
                    if isinstance(exc, MlflowException):
                        raise ServiceError(
                            f"MLflow at {self.safe_uri} refused to {what}: {redact(exc.message)}"
                        ) from None
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise ServiceError(
                        self.unreachable_message(what, attempt, time.monotonic() - start, exc)
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
