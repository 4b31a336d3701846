"""Step outputs that are whole or absent, on local disk or in S3.

``with staged_output(dest) as folder:`` yields an empty local folder for a step to write
into, and publishes it only when the block finishes without an exception:

* a local ``dest``: the folder is a temporary sibling (``.<name>.fcpts-tmp-<id>``),
  renamed to ``dest`` on success (an earlier ``dest`` is replaced) and removed on
  failure, so a killed step never leaves a half-written output that a later step would
  take as complete.
* an ``s3://bucket/prefix`` ``dest``: the folder is a local temporary folder; on success
  the earlier index object is deleted, every file is uploaded (each object whole or
  absent: temporary key, then server-side copy) and then the index
  ``<prefix>/fcpts-index.json`` is written, listing every file with its sha256 and
  size. The index is written last: an output without it is incomplete.

``fetch_output(uri)`` is the reader: for S3 it reads the index, downloads every file it
lists, checks each sha256 and renames the folder into place; a local output is returned
as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcpts.errors import FcptsError, UserError
from fcpts.storage import s3
from fcpts.storage.cache import cache_root, is_s3_uri, relative_key

if TYPE_CHECKING:
    from botocore.client import BaseClient

INDEX_NAME = "fcpts-index.json"
INDEX_FORMAT = 1


def _prefix(uri: str) -> tuple[str, str]:
    """(bucket, prefix without a trailing "/") of an output URI."""
    bucket, key = s3.parse_s3_uri(uri)
    return bucket, key.rstrip("/")


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


@contextlib.contextmanager
def staged_output(dest: str | os.PathLike, *, client: BaseClient | None = None) -> Iterator[Path]:
    """A local folder to write an output into, published to ``dest`` on success only."""
    if is_s3_uri(str(dest)):
        client = client or s3.make_client()
        _check_bucket(client, str(dest), "write the output")  # fail before the step does its work
        tmp = Path(tempfile.mkdtemp(prefix="fcpts-output-"))
        try:
            yield tmp
            publish(tmp, str(dest), client=client)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    final = Path(dest).expanduser()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of the output {final}: {exc}") from None
    if final.exists() and not final.is_dir():
        raise UserError(f"output {final} is a file: give a folder path")
    tmp = final.parent / f".{final.name}{s3.TMP_MARKER}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        s3._replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _check_bucket(client: BaseClient, uri: str, action: str) -> None:
    from botocore.exceptions import ClientError

    bucket, _ = _prefix(uri)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if str(exc.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket"):
            raise UserError(
                f"cannot {action} {uri}: bucket {bucket!r} does not exist at "
                f"{client.meta.endpoint_url}; create it or fix the bucket name"
            ) from None
        raise s3._translate(exc, client, uri, action) from exc
    except Exception as exc:
        new = s3._translate(exc, client, uri, action)
        if new is exc:
            raise
        raise new from exc


def publish(folder: str | os.PathLike, uri: str, *, client: BaseClient | None = None) -> dict:
    """Upload a finished output folder to ``uri`` and write its index last; return the
    index (``{"format": 1, "files": {path: {"sha256", "size"}}}``)."""
    folder = Path(folder)
    bucket, prefix = _prefix(uri)
    if (folder / INDEX_NAME).exists():
        raise FcptsError(f"output folder {folder} holds a file named {INDEX_NAME}: fcpts writes it")
    client = client or s3.make_client()
    index_key = _key(prefix, INDEX_NAME)
    with s3._errors(client, uri, "publish the output to"):
        client.delete_object(Bucket=bucket, Key=index_key)  # the earlier output is void now
    written = s3.upload(
        folder, f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/", client=client
    )
    files = {}
    for key, sha in sorted(written.items()):
        rel = key[len(prefix) + 1 :] if prefix else key
        files[rel] = {"sha256": sha, "size": (folder / rel).stat().st_size}
    index = {"format": INDEX_FORMAT, "files": files}
    with tempfile.TemporaryDirectory(prefix="fcpts-index-") as tmp:
        path = Path(tmp, INDEX_NAME)
        path.write_text(json.dumps(index, indent=1, sort_keys=True))
        s3.upload(path, f"s3://{bucket}/{index_key}", client=client)
    return index


def read_index(uri: str, *, client: BaseClient | None = None) -> dict[str, Any]:
    """The index of a published S3 output; a UserError when there is none (incomplete)."""
    bucket, prefix = _prefix(uri)
    client = client or s3.make_client()
    index_uri = f"s3://{bucket}/{_key(prefix, INDEX_NAME)}"
    if s3._head(client, bucket, _key(prefix, INDEX_NAME), "read") is None:
        _check_bucket(client, uri, "read the output")
        raise UserError(
            f"{uri} is not a complete fcpts output: it has no {INDEX_NAME} (the step that "
            "writes it did not finish); run that step again"
        )
    with tempfile.TemporaryDirectory(prefix="fcpts-index-") as tmp:
        text = s3.download(index_uri, tmp, client=client).read_text()
    try:
        index = json.loads(text)
        files = index["files"]
        ok = index.get("format") == INDEX_FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise FcptsError(f"{index_uri} is not an fcpts output index of format {INDEX_FORMAT}")
    for rel in files:
        relative_key("", str(rel), uri)
    return index


def fetch_output(
    uri: str | os.PathLike,
    local: str | os.PathLike | None = None,
    *,
    client: BaseClient | None = None,
) -> Path:
    """The local folder of a published output.

    A local path is returned as it is (``staged_output`` made it whole or absent). An S3
    output is downloaded into ``local`` (replaced if present), or into the cache when
    ``local`` is None, every file checked against the sha256 in the index.
    """
    if not is_s3_uri(str(uri)):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise UserError(f"output {uri} does not exist: run the step that writes it first")
        return path
    uri = str(uri)
    bucket, prefix = _prefix(uri)
    client = client or s3.make_client()
    index = read_index(uri, client=client)
    if local is None:
        digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()
        final = cache_root() / ".outputs" / digest[:40]
        if final.is_dir():
            return final
    else:
        final = Path(local).expanduser()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}{s3.TMP_MARKER}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for rel, meta in sorted(index["files"].items()):
            target = tmp.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            object_uri = f"s3://{bucket}/{_key(prefix, rel)}"
            got = s3.download(object_uri, target.parent, client=client)
            s3._check_sha(meta["sha256"], s3.sha256_file(got), object_uri, "its content")
        s3._replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
