"""S3 sources on local disk: each object or folder downloaded once per version.

``fetch("s3://bucket/models/minilm/")`` returns a local folder holding the objects under
that prefix (a Hugging Face model folder, an ImageFolder tree); ``fetch("s3://bucket/
x.safetensors")`` returns a local file. boto3 reads them with the standard AWS
environment (``AWS_ENDPOINT_URL_S3`` for MinIO or moto), streaming to disk in multipart
ranged GETs (see :func:`fcpts.storage.s3.download`), never into memory.

Cache layout: ``<root>/<bucket>/<entry>/<name>`` with ``<entry>`` a digest of the key
and the version (the objects' ``sha256`` metadata, else their ETags and sizes), so a
changed object is downloaded again and an unchanged one is not. ``<root>`` is
``$FCPTS_CACHE/s3``, else ``$XDG_CACHE_HOME/fcpts/s3``, else ``~/.cache/fcpts/s3``.

An entry is built in a temporary folder next to it and renamed into place when every
object is downloaded and verified (sha256 where the object carries it), so a killed
download never looks complete; temporary folders older than a day are removed. Keys that
would leave the folder (``..``, empty path segments, a leading ``/``) are refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fcpts.digests import sha256_json
from fcpts.errors import ServiceError, UserError
from fcpts.storage import local, s3
from fcpts.storage.s3keys import relative_key

if TYPE_CHECKING:
    from botocore.client import BaseClient

__all__ = ["cache_root", "fetch", "is_s3_uri", "relative_key"]

S3_PREFIX = "s3://"
ENTRY_FILE = ".fcpts-entry.json"
STALE_SECONDS = 24 * 3600


def is_s3_uri(text: object) -> bool:
    return isinstance(text, str) and text.strip().startswith(S3_PREFIX)


def cache_root(environ: Mapping[str, str] | None = None) -> Path:
    """Where S3 sources are cached (see the module docstring)."""
    env = os.environ if environ is None else environ
    if env.get("FCPTS_CACHE"):
        return Path(env["FCPTS_CACHE"]).expanduser() / "s3"
    base = env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "fcpts" / "s3"


def fetch(
    uri: str, *, cache: str | os.PathLike | None = None, client: BaseClient | None = None
) -> Path:
    """The local copy of an S3 object or folder, downloaded into the cache when missing
    or changed. Errors name the URI: ``UserError`` for a bad URI, a missing bucket or key
    or refused credentials, ``ServiceError`` for an unreachable endpoint."""
    client = client or s3.make_client()
    listing = s3.describe(client, uri)
    version = sha256_json([listing.source, listing.kind, listing.versions])[:40]
    folder = (Path(cache) if cache is not None else cache_root()) / listing.bucket
    entry = folder / version
    if (entry / ENTRY_FILE).is_file() and (entry / listing.name).exists():
        return entry / listing.name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the cache folder {folder} ({exc}); set FCPTS_CACHE"
        ) from None
    _remove_stale(folder)
    with local.staging(folder, version) as tmp:
        s3.download_listing(client, listing, tmp)
        if s3.describe(client, uri).versions != listing.versions:
            raise ServiceError(f"{listing.uri} changed during the download; retry")
        record = {
            "uri": listing.uri,
            "kind": listing.kind,
            "objects": dict(listing.versions),
            "fetched": time.time(),
        }
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / ENTRY_FILE).is_file():  # not a concurrent fetch that won
                raise
    return entry / listing.name


def _remove_stale(folder: Path) -> None:
    """Temporary folders of downloads killed more than a day ago (from fcpts versions
    before the staging folders were locked; see :mod:`fcpts.storage.local`)."""
    now = time.time()
    for tmp in folder.glob(f".*{s3.TMP_MARKER}*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
