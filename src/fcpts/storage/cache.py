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
import hashlib
import json
import os
import posixpath
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from fcpts.errors import ServiceError, UserError
from fcpts.storage import s3

if TYPE_CHECKING:
    from botocore.client import BaseClient

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


def relative_key(prefix: str, key: str, uri: str) -> str:
    """``key`` below ``prefix``; a UserError when it would leave the folder."""
    rel = key[len(prefix) :]
    if not key.startswith(prefix) or any(p in ("", ".", "..") for p in rel.split("/")):
        raise UserError(
            f"refusing to download s3://{uri[len(S3_PREFIX) :].split('/', 1)[0]}/{key}: its "
            f"path below {uri} ({rel!r}) is empty or leaves the folder; rename the object"
        )
    return rel


def _version(head: Mapping) -> str:
    sha = (head.get("Metadata") or {}).get(s3.SHA256_METADATA_KEY)
    return f"sha256:{sha}" if sha else f"etag:{str(head.get('ETag', '')).strip(chr(34))}"


def _listing(client: BaseClient, bucket: str, prefix: str, uri: str) -> list[tuple[str, str]]:
    """(relative path, version) of every object under prefix, sorted."""
    out = []
    with s3._errors(client, uri, "download"):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or s3.TMP_MARKER in key:
                    continue
                rel = relative_key(prefix, key, uri)
                out.append((rel, f"etag:{str(obj['ETag']).strip(chr(34))}:{obj['Size']}"))
    return sorted(out)


def _describe(client: BaseClient, uri: str) -> tuple[str, str, str, list[tuple[str, str]]]:
    """(download URI, local name, kind, listing) of an object or a folder."""
    bucket, key = s3.parse_s3_uri(uri)
    if key and not key.endswith("/"):
        head = s3._head(client, bucket, key, "download")
        if head is not None:
            return uri, posixpath.basename(key), "file", [("", _version(head))]
        prefix = key + "/"
    else:
        prefix = key
    listing = _listing(client, bucket, prefix, uri)
    if not listing:
        raise s3.nothing_to_download(uri, bucket, key, prefix)
    name = posixpath.basename(prefix.rstrip("/")) or bucket
    return f"s3://{bucket}/{prefix}", name, "folder", listing


def fetch(
    uri: str, *, cache: str | os.PathLike | None = None, client: BaseClient | None = None
) -> Path:
    """The local copy of an S3 object or folder, downloaded into the cache when missing
    or changed. Errors name the URI: ``UserError`` for a bad URI, a missing bucket or key
    or refused credentials, ``ServiceError`` for an unreachable endpoint."""
    uri = uri.strip()
    bucket, key = s3.parse_s3_uri(uri)
    client = client or s3.make_client()
    source, name, kind, listing = _describe(client, uri)
    version = hashlib.sha256(json.dumps([source, kind, listing]).encode()).hexdigest()[:40]
    folder = Path(cache) if cache is not None else cache_root()
    folder = folder / bucket
    entry = folder / version
    if (entry / ENTRY_FILE).is_file() and (entry / name).exists():
        return entry / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(
            f"cannot create the cache folder {folder} ({exc}); set FCPTS_CACHE"
        ) from None
    _remove_stale(folder)
    tmp = folder / f".{version}{s3.TMP_MARKER}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        s3.download(source, tmp, client=client)
        if _describe(client, uri)[3] != listing:
            raise ServiceError(f"{uri} changed during the download; retry")
        record = {"uri": uri, "kind": kind, "objects": dict(listing), "fetched": time.time()}
        (tmp / ENTRY_FILE).write_text(json.dumps(record, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:
            if not (entry / ENTRY_FILE).is_file():  # not a concurrent fetch that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry / name


def _remove_stale(folder: Path) -> None:
    """Temporary folders of downloads killed more than a day ago."""
    now = time.time()
    for tmp in folder.glob(f".*{s3.TMP_MARKER}*"):
        with contextlib.suppress(OSError):
            if now - tmp.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
