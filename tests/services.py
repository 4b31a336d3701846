"""Start and stop real services (PostgreSQL, a moto S3 server, an MLflow tracking server)
for tests.

Plain helpers, not fixtures: ``tests/conftest.py`` wraps them. Every service

* listens on a free port of 127.0.0.1 only,
* runs in its own session (``Popen(start_new_session=True)``) and is stopped by
  signalling its whole process group, so no worker or backend outlives it,
* is waited for with a bounded timeout; a service that dies or does not become ready
  raises ``RuntimeError`` with the tail of its log,
* is a context manager (``with start_moto(tmp) as moto: ...``).

``ServiceUnavailable`` means the software is not installed (e.g. no PostgreSQL
binaries): the only case in which a test may be skipped instead of failing.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

PG_USER_NAME = "fcpts-pg"  # the OS user PostgreSQL runs as when we are root
PG_SUPERUSER = "fcpts"  # the database role the tests connect as (trust auth, loopback)
PG_DATABASE = "fcpts"
HOST = "127.0.0.1"
# A timeout in a test guards against a hang; it never measures speed. Generous, since a
# loaded machine runs 5-10x slower; FCPTS_TEST_HANG_SCALE multiplies it (e.g. 3 on a
# crowded runner). Every wait in the tests that fails when it runs out uses it.
HANG_GUARD_S = 1800 * float(os.environ.get("FCPTS_TEST_HANG_SCALE", "1"))


class ServiceUnavailable(Exception):
    """The software a service needs is not installed; the message says what to install."""


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """A TCP port of 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(lines[-n:]) or "(log is empty)"


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def _http_status(url: str, timeout: float = 2.0) -> int | None:
    """HTTP status of GET url, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def _kill_group(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Send sig to proc's process group, wait up to timeout, then SIGKILL the group."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    # The leader may be gone while children of the group are still alive: always
    # finish the group off.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


class _Service:
    """A process started in its own session, stopped by killing its process group."""

    name = "service"
    stop_signal = signal.SIGTERM

    def __init__(self, proc: subprocess.Popen, log_path: Path, port: int):
        self.proc = proc
        self.log_path = log_path
        self.port = port

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, n: int = 40) -> str:
        return _tail(self.log_path, n)

    def stop(self) -> None:
        _kill_group(self.proc, self.stop_signal, timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self, check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.proc.returncode} before it was "
                    f"ready ({what}); log {self.log_path}:\n{self.log_tail()}"
                )
            if check():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"{self.name} was not ready ({what}) within {timeout:.0f} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.2)


def _popen(cmd: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **kwargs,
        )


# -------------------------------------------------------------------------- postgres


def find_postgres_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres (newest version first)."""
    needed = ("initdb", "pg_ctl", "postgres")

    def version(d: str) -> tuple:
        v = Path(d).parent.name
        return tuple(int(p) for p in v.split(".") if p.isdigit())

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).resolve().parent))
    for d in candidates:
        if all(os.access(Path(d, b), os.X_OK) for b in needed):
            return Path(d)
    raise ServiceUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql "
        "(apt-get install postgresql)"
    )


def _pg_os_user() -> pwd.struct_passwd | None:
    """The non-root OS user to run PostgreSQL as, or None when we are not root.

    PostgreSQL refuses to run as root. Uses ``fcpts-pg`` (created with useradd if
    missing and possible), else ``nobody``.
    """
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(PG_USER_NAME)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    if os.access(useradd, os.X_OK):
        subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER_NAME],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(PG_USER_NAME)
    with contextlib.suppress(KeyError):
        return pwd.getpwnam("nobody")
    raise ServiceUnavailable(
        f"running as root and no non-root user to run PostgreSQL as: create one "
        f"(useradd --system {PG_USER_NAME})"
    )


def _as_user(user: pwd.struct_passwd | None, home: Path) -> dict:
    """Popen keyword arguments that run a command as user (no runuser/su needed)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", LANG="C")
    if user is None:
        return {"env": env}
    env.update(HOME=str(home), USER=user.pw_name, LOGNAME=user.pw_name)
    return {"env": env, "user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


class PostgresService(_Service):
    """A throw-away PostgreSQL server on 127.0.0.1 with trust authentication."""

    name = "PostgreSQL"
    stop_signal = signal.SIGINT  # "fast" shutdown

    def __init__(self, proc, log_path, port, *, base_dir: Path, bindir: Path):
        super().__init__(proc, log_path, port)
        self.base_dir = base_dir
        self.bindir = bindir
        self.user = PG_SUPERUSER
        self.database = PG_DATABASE
        self.keep_log_in: Path | None = None

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg2 driver) of a database on this server."""
        return f"postgresql+psycopg2://{self.user}@{HOST}:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``fcpts`` database, for SQLAlchemy, MLflow and Optuna."""
        return self.url_for(self.database)

    @property
    def dsn(self) -> str:
        """libpq connection string of the ``fcpts`` database (psycopg2.connect(dsn))."""
        return f"host={HOST} port={self.port} user={self.user} dbname={self.database}"

    def create_database(self, name: str) -> str:
        """Create database name (owned by the test role) and return its SQLAlchemy URL."""
        subprocess.run(
            [
                str(self.bindir / "createdb"),
                "-h",
                HOST,
                "-p",
                str(self.port),
                "-U",
                self.user,
                name,
            ],
            check=True,
            capture_output=True,
            timeout=HANG_GUARD_S,
            env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
        )
        return self.url_for(name)

    def stop(self) -> None:
        super().stop()
        if self.base_dir is not None:
            # The cluster goes away; its log is kept in the caller's tmpdir.
            if self.keep_log_in is not None:
                with contextlib.suppress(OSError):
                    shutil.copy(self.log_path, Path(self.keep_log_in) / "postgres.log")
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None


def start_postgres(tmpdir, *, timeout: float = HANG_GUARD_S) -> PostgresService:
    """initdb a fresh cluster, start ``postgres`` on a free loopback port, create the
    database ``fcpts``.

    When running as root the server runs as a non-root user (see ``_pg_os_user``) and the
    cluster lives in a fresh directory under the system temp dir owned by that user (the
    caller's tmpdir, e.g. pytest's, is usually mode 0700 and not reachable by it); a copy
    of the server log is left in tmpdir when start-up fails.
    """
    bindir = find_postgres_bindir()
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    user = _pg_os_user()
    if user is None:
        base = Path(tempfile.mkdtemp(prefix="pg-", dir=tmpdir))
    else:
        base = Path(tempfile.mkdtemp(prefix="fcpts-pg-"))
        os.chown(base, user.pw_uid, user.pw_gid)
    os.chmod(base, 0o700)
    data, sock, log_path = base / "data", base / "sock", base / "postgres.log"
    run_kw = _as_user(user, base)

    def as_user(cmd: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            cmd,
            cwd=base,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=HANG_GUARD_S,
            **run_kw,
        )

    try:
        mk = as_user(["mkdir", "-m", "700", str(data), str(sock)])
        if mk.returncode != 0:
            raise RuntimeError(f"cannot create {data}: {mk.stderr.strip()}")
        init = as_user(
            [
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                PG_SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]
        )
        if init.returncode != 0:
            raise RuntimeError(
                f"initdb failed (exit {init.returncode}):\n{(init.stdout + init.stderr)[-4000:]}"
            )
        last_error: Exception | None = None
        for _attempt in range(3):  # a new port if another process took ours meanwhile
            port = free_port()
            cmd = [
                str(bindir / "postgres"),
                "-D",
                str(data),
                "-p",
                str(port),
                "-c",
                f"listen_addresses={HOST}",
                "-c",
                f"unix_socket_directories={sock}",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
            ]
            proc = _popen(cmd, log_path, cwd=base, **run_kw)
            svc = PostgresService(proc, log_path, port, base_dir=None, bindir=bindir)
            pg_isready = [str(bindir / "pg_isready"), "-q", "-h", HOST, "-p", str(port)]
            try:
                svc._wait_ready(
                    lambda pg_isready=pg_isready: (
                        subprocess.run(pg_isready, check=False, timeout=HANG_GUARD_S).returncode
                        == 0
                    ),
                    timeout,
                    f"pg_isready on {HOST}:{port}",
                )
            except RuntimeError as e:
                svc.stop()
                last_error = e
                if "already in use" in _tail(log_path, 20):
                    continue
                raise
            svc.base_dir = base
            svc.keep_log_in = tmpdir
            try:
                svc.create_database(PG_DATABASE)
            except subprocess.CalledProcessError as e:
                svc.stop()
                raise RuntimeError(
                    f"createdb {PG_DATABASE} failed: {e.stderr.decode(errors='replace')}\n"
                    f"log:\n{_tail(log_path)}"
                ) from None
            return svc
        raise last_error  # type: ignore[misc]
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.copy(log_path, tmpdir / "postgres.log")
        shutil.rmtree(base, ignore_errors=True)
        raise


# ------------------------------------------------------------------------------ moto


class MotoService(_Service):
    """A moto S3 (and other AWS services) server on 127.0.0.1."""

    name = "moto server"

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS environment variables that point boto3 (and MLflow) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def client(self, service: str = "s3"):
        """A boto3 client of this server with the test credentials."""
        import boto3

        e = self.env()
        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
            region_name=e["AWS_DEFAULT_REGION"],
        )


def start_moto(tmpdir, *, timeout: float = HANG_GUARD_S, env: dict | None = None) -> MotoService:
    """``python -m moto.server`` on a free loopback port (the running interpreter's moto)."""
    tmpdir = Path(tmpdir)
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        log_path = tmpdir / f"moto-{port}.log"
        proc = _popen(
            [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(port)],
            log_path,
            cwd=tmpdir,
            env={**os.environ, **(env or {})},
        )
        svc = MotoService(proc, log_path, port)
        try:
            svc._wait_ready(
                lambda svc=svc: _http_status(f"{svc.endpoint_url}/moto-api/") is not None,
                timeout,
                f"HTTP on {svc.endpoint_url}",
            )
            return svc
        except RuntimeError as e:
            svc.stop()
            last_error = e
            if "already in use" not in svc.log_tail(20):
                raise
    raise last_error  # type: ignore[misc]


# ---------------------------------------------------------------------------- mlflow


class MlflowService(_Service):
    """An ``mlflow server`` (tracking + proxied artifacts) on 127.0.0.1."""

    name = "MLflow server"

    def __init__(self, proc, log_path, port, *, backend_store_uri, artifacts_destination):
        super().__init__(proc, log_path, port)
        self.backend_store_uri = backend_store_uri
        self.artifacts_destination = artifacts_destination

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"


def start_mlflow_server(
    tmpdir,
    backend_store_uri: str,
    artifacts_destination: str | None = None,
    env: dict | None = None,
    *,
    timeout: float = HANG_GUARD_S,
    port: int | None = None,
) -> MlflowService:
    """``mlflow server`` with one worker, serving artifacts from artifacts_destination
    (default: ``tmpdir/mlartifacts``); env is added to the server's environment (e.g.
    ``MotoService.env()`` for an ``s3://`` destination). Ready when GET /health answers
    200. ``port``: this port (e.g. a restart on the port of a stopped server), else a free
    one.
    """
    tmpdir = Path(tmpdir)
    tmpdir.mkdir(parents=True, exist_ok=True)
    if artifacts_destination is None:
        artifacts_destination = str(tmpdir / "mlartifacts")
    server_env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **(env or {}),
    }
    # A tracking URI inherited from the caller's environment means nothing to the server.
    server_env.pop("MLFLOW_TRACKING_URI", None)
    last_error: Exception | None = None
    fixed = port
    for _attempt in range(1 if fixed else 3):
        port = fixed or free_port()
        log_path = tmpdir / f"mlflow-{port}.log"
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            HOST,
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            backend_store_uri,
            "--artifacts-destination",
            artifacts_destination,
        ]
        proc = _popen(cmd, log_path, cwd=tmpdir, env=server_env)
        svc = MlflowService(
            proc,
            log_path,
            port,
            backend_store_uri=backend_store_uri,
            artifacts_destination=artifacts_destination,
        )
        try:
            svc._wait_ready(
                lambda svc=svc: _http_status(f"{svc.tracking_uri}/health") == 200,
                timeout,
                f"GET {svc.tracking_uri}/health",
            )
            return svc
        except RuntimeError as e:
            svc.stop()
            last_error = e
            if "already in use" not in svc.log_tail(20):
                raise
    raise last_error  # type: ignore[misc]
