"""First use of a SQLite database by several processes at once.

MLflow's SQLAlchemy stores and Optuna's RDBStorage create their tables when they find none,
without a lock: two processes opening a new database together both run ``CREATE TABLE``
and the later fails (``table latest_metrics already exists``, ``table trial_params already
exists``). :func:`first_use` serializes that step with an exclusive ``flock`` on a file
beside the database, so the first process creates the schema and the others find it.

No heavy imports: the sweep uses it without loading MLflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_SUFFIX = ".fcpts-init.lock"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (with or without a driver, e.g.
    ``sqlite+pysqlite:///``), else None (also for an in-memory database)."""
    scheme, sep, rest = str(uri).partition(":///")
    if not sep or scheme.split("+", 1)[0].lower() != "sqlite":
        return None
    path = rest.split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path("/" + path.lstrip("/")) if rest.startswith("/") else Path(path)


@contextlib.contextmanager
def first_use(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on ``<database>.fcpts-init.lock`` for a SQLite URI (its folder
    is created); for any other URI do nothing. Blocks while another process holds it."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db = db.absolute()
    db.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(db.with_name(db.name + LOCK_SUFFIX), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
