"""Local staging folders that a killed process cannot leave behind for good.

A staging folder is ``<parent>/.<name>.fcpts-tmp-<uuid>``, created empty and locked
(``flock`` on the folder) for as long as the process writing into it lives. The lock
goes with the process, so a folder of that pattern whose lock can be taken belongs to
no live process: :func:`remove_abandoned` deletes it (and puts back an earlier output
that a kill stranded under its ``-old-`` name). Only fcpts's own staging names next to
``<name>`` are touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TMP_MARKER = ".fcpts-tmp-"
OLD = "old-"
LEGACY_MARKERS = (".fcpts-stage-",)  # staging names of earlier fcpts versions


def staging_name(name: str) -> str:
    return f".{name}{TMP_MARKER}{uuid.uuid4().hex}"


def _locked(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or None when another
    process holds it (or the folder is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_abandoned(parent: Path, name: str) -> None:
    """Delete the staging folders next to ``parent/name`` that no live process holds; an
    earlier output stranded under its ``-old-`` name by a kill goes back to ``name``."""
    patterns = [f".{name}{TMP_MARKER}*"] + [f".{name}{m}*" for m in LEGACY_MARKERS]
    try:
        found = sorted({p for pattern in patterns for p in parent.glob(pattern)})
    except OSError:
        return
    for path in found:
        fd = _locked(path)
        if fd is None:
            continue
        try:
            _remove_or_restore(path, parent / name)
        finally:
            os.close(fd)


def _remove_or_restore(path: Path, final: Path) -> None:
    if path.name.startswith(f".{final.name}{TMP_MARKER}{OLD}") and not final.exists():
        with contextlib.suppress(OSError):
            os.rename(path, final)
            return
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def staging(parent: Path, name: str) -> Iterator[Path]:
    """A new, empty, locked folder ``parent/.<name>.fcpts-tmp-<uuid>``, removed when the
    block ends unless the block renamed it away; abandoned ones are removed first."""
    remove_abandoned(parent, name)
    while True:
        tmp = parent / staging_name(name)
        tmp.mkdir()
        fd = _locked(tmp)
        # another process's cleanup may have taken it between mkdir and flock
        if fd is not None and tmp.is_dir() and os.fstat(fd).st_ino == tmp.stat().st_ino:
            break
        if fd is not None:
            os.close(fd)
    try:
        yield tmp
    finally:
        try:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        finally:
            os.close(fd)


def replace(src: Path, dst: Path) -> None:
    """Rename src to dst, removing what dst was (a rename cannot replace a folder). The
    earlier folder stays locked while it is set aside, so no cleanup restores it."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}{TMP_MARKER}{OLD}{uuid.uuid4().hex}"
        fd = _locked(dst)
        try:
            os.replace(dst, old)
            os.replace(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)
    else:
        os.replace(src, dst)
