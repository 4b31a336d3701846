"""The index of a published S3 output (``fcpts-index.json``), checked as it is read.

``{"format": 1, "files": {path: {"sha256": hex, "size": bytes, "object": key}}}``: one
entry per file of the output, ``path`` relative to the output's prefix; ``object`` (the
key below the prefix that holds the file's bytes) only while a republish is switching,
absent when the file sits under its own path. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fcpts.errors import UserError

INDEX_FORMAT = 1
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def _bad(index_uri: str, why: str) -> UserError:
    return UserError(
        f"{index_uri} is not a valid fcpts output index of format {INDEX_FORMAT} ({why}); "
        "run the step that writes this output again"
    )


def _safe_path(path: Any, index_uri: str, what: str) -> str:
    if not isinstance(path, str) or any(p in ("", ".", "..") for p in path.split("/")):
        raise UserError(
            f"refusing to download the {what} {path!r} of {index_uri}: its path is empty or "
            "leaves the folder; run the step that writes this output again"
        )
    return path


def _check_entry(rel: str, meta: Any, index_uri: str) -> None:
    if not isinstance(meta, dict):
        raise _bad(index_uri, f"the entry of {rel!r} is not an object")
    sha = meta.get("sha256")
    if not isinstance(sha, str) or not _SHA256_RE.match(sha):
        raise _bad(index_uri, f"the entry of {rel!r} has no sha256 of 64 hex digits")
    size = meta.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _bad(index_uri, f"the entry of {rel!r} has no size in bytes")
    if "object" in meta:
        _safe_path(meta["object"], index_uri, "object")


def read_index_text(text: str, index_uri: str) -> dict[str, Any]:
    """The index in ``text`` (read from ``index_uri``); a UserError naming the index
    when it is not one fcpts can download safely."""
    try:
        index = json.loads(text)
    except ValueError as exc:
        raise _bad(index_uri, f"not JSON: {exc}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise _bad(index_uri, "no format 1")
    files = index.get("files")
    if not isinstance(files, dict):
        raise _bad(index_uri, "no files")
    for rel, meta in files.items():
        _safe_path(rel, index_uri, "file")
        _check_entry(rel, meta, index_uri)
    for rel in files:
        parts = rel.split("/")
        for i in range(1, len(parts)):
            folder = "/".join(parts[:i])
            if folder in files:
                raise _bad(
                    index_uri, f"{folder!r} is listed as a file and as the folder of {rel!r}"
                )
    return index
