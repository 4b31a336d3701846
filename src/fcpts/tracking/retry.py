"""How calls to a tracking store are retried, and how a store that does not answer reads.

HTTP stores (an ``mlflow server``): MLflow's own client retries, by its own settings
(urllib3 underneath: a refused connection, a timeout, HTTP 408/429/500/502/503/504):
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` retries, the n-th waiting
``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR * 2**(n-1)`` seconds (the first none) plus up to
``MLFLOW_HTTP_REQUEST_BACKOFF_JITTER`` seconds, each request at most
``MLFLOW_HTTP_REQUEST_TIMEOUT`` seconds. Importing ``fcpts.tracking`` sets the defaults of
:data:`HTTP_DEFAULTS` unless the environment sets them: 6 retries over about a minute
(0, 2, 4, 8, 16, 32 s), which outlasts an ordinary restart of the server, and stays bounded.

Database stores (SQLite, PostgreSQL, ...): MLflow does not retry, so fcpts does
(:class:`RetryPolicy`, ``FCPTS_MLFLOW_ATTEMPTS`` / ``FCPTS_MLFLOW_BACKOFF``): SQLite's
"database is locked", a refused or dropped database connection. Nothing else is retried.

An explicit :class:`RetryPolicy` given for an HTTP store is handed to MLflow as its settings
for the duration of the call (:func:`http_retries`): ``RetryPolicy(attempts=1)`` is one
try, for a quick reachability check or a best-effort send.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import threading
from collections.abc import Iterator
from dataclasses import dataclass

ENV_ATTEMPTS = "FCPTS_MLFLOW_ATTEMPTS"
ENV_BACKOFF = "FCPTS_MLFLOW_BACKOFF"
ENV_HTTP_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
ENV_HTTP_BACKOFF = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
ENV_HTTP_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
HTTP_DEFAULTS = {ENV_HTTP_RETRIES: "6", ENV_HTTP_BACKOFF: "1", ENV_HTTP_JITTER: "1.0"}

_ENV_LOCK = threading.Lock()


def _read(name: str, cast, default):
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return cast(raw)
    except ValueError:
        return default


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the n-th retry waits ``backoff * 2**(n-1)`` seconds (at most
    ``max_delay``) plus up to 25% jitter. The default spans about a minute, like MLflow's
    HTTP retries under :data:`HTTP_DEFAULTS`."""

    attempts: int = 7
    backoff: float = 1.0
    max_delay: float = 32.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            attempts=max(1, _read(ENV_ATTEMPTS, int, cls.attempts)),
            backoff=max(0.0, _read(ENV_BACKOFF, float, cls.backoff)),
        )

    def delays(self) -> Iterator[float]:
        for n in range(self.attempts - 1):
            base = min(self.max_delay, self.backoff * (2**n))
            yield base * (1 + 0.25 * random.random())


def http_attempts() -> int:
    """How many times MLflow's HTTP client tries a request, by its settings now."""
    return 1 + max(0, _read(ENV_HTTP_RETRIES, int, int(HTTP_DEFAULTS[ENV_HTTP_RETRIES])))


@contextlib.contextmanager
def http_retries(policy: RetryPolicy | None) -> Iterator[None]:
    """MLflow's HTTP retry settings from ``policy`` for the duration (None: as they are).

    MLflow reads them from the environment at every request; they are restored after. The
    backoff factor is a whole number of seconds in MLflow, so it is rounded up."""
    if policy is None:
        yield
        return
    values = {
        ENV_HTTP_RETRIES: str(max(0, policy.attempts - 1)),
        ENV_HTTP_BACKOFF: str(math.ceil(policy.backoff)),
    }
    with _ENV_LOCK, scoped_env(values):
        yield


@contextlib.contextmanager
def scoped_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# (what the low-level error says, what the user is told), first match wins
_CAUSES = (
    (("Connection refused", "NewConnectionError"), "connection refused"),
    (("Name or service not known", "nodename nor servname", "getaddrinfo"), "host name not found"),
    (("timed out", "Timeout"), "timed out"),
    (("RemoteDisconnected", "Connection reset", "Connection aborted"), "connection dropped"),
    (("too many 5", "too many 4", "ResponseError"), "the server kept answering with errors"),
)


def short_cause(text: str) -> str:
    """A few words for a connection failure; other errors' first line, at most 300 characters."""
    for needles, cause in _CAUSES:
        if any(n in text for n in needles):
            return cause
    return text.splitlines()[0][:300] if text else "no detail"


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
    from mlflow.exceptions import MlflowException

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
        "Connection" in name or "Timeout" in name or "Protocol" in name or "Retry" in name
    ):
        return True
    if module.startswith("sqlalchemy") and name == "OperationalError":
        return True
    return any(t in str(exc).lower() for t in ("database is locked", "connection refused"))
