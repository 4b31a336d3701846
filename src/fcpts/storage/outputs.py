"""Step outputs that are whole or absent, on local disk or in S3.

``with staged_output(dest) as folder:`` yields an empty local folder for a step to write
into, and publishes it only when the block finishes without an exception:

* a local ``dest``: the folder is a locked temporary sibling (``.<name>.fcpts-tmp-<id>``,
  see :mod:`fcpts.storage.local`), renamed to ``dest`` on success (an earlier ``dest`` is
  replaced) and removed on failure, so a killed step never leaves a half-written output
  that a later step would take as complete; a later run removes what a kill left.
* an ``s3://bucket/prefix`` ``dest``: the folder is a locked temporary folder in the
  cache; on success every file is uploaded (each object whole or absent: temporary key,
  then server-side copy) and then the index ``<prefix>/fcpts-index.json`` is written,
  listing every file with its sha256 and size. The index is written last: an output
  without it is incomplete. The published folder stays in the cache as the local copy
  that :func:`fetch_output` finds.

A republish never leaves the prefix without a complete output: the new files go under
``<prefix>/.fcpts-staging-<id>/``, the index is switched to them in one write, the files
are copied to their plain keys, the index is switched to those, and only then are the
staged objects and the earlier output's files that the new one lacks deleted. Staged
objects of a publish killed before its switch are removed by a later publish once they
are older than a day (no live publish takes that long between its first upload and its
switch; S3 has no lock to tell a live one from a dead one).

``fetch_output(uri)`` is the reader: for S3 it reads the index, downloads every file it
lists, checks each sha256 and renames the folder into place; a local output is returned
as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcpts.digests import sha256_file, sha256_json
from fcpts.errors import FcptsError, UserError
from fcpts.storage import local, s3
from fcpts.storage.cache import STALE_SECONDS, cache_root, is_s3_uri
from fcpts.storage.index import INDEX_FORMAT, read_index_text
from fcpts.storage.s3errors import check_bucket, head, object_uri

if TYPE_CHECKING:
    from botocore.client import BaseClient

INDEX_NAME = "fcpts-index.json"
OUTPUTS_FOLDER = ".outputs"


def output_prefix(uri: str) -> tuple[str, str]:
    """(bucket, prefix without a trailing "/") of an output URI."""
    bucket, key = s3.parse_s3_uri(uri)
    return bucket, key.rstrip("/")


def _key(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel


def outputs_cache() -> Path:
    """The local folder holding the copies of published S3 outputs."""
    return cache_root() / OUTPUTS_FOLDER


def cached_copy(index: Mapping[str, Any]) -> Path:
    """Where the local copy of the output with this index lives in the cache."""
    return outputs_cache() / sha256_json(index)[:40]


@dataclass
class Stage:
    """The local folder a step writes into, and once published, the local copy."""

    folder: Path
    published: Path | None = None


@contextlib.contextmanager
def staged_remote(uri: str, *, client: BaseClient | None = None) -> Iterator[Stage]:
    """A locked local folder in the cache, published to the S3 ``uri`` when the block
    succeeds and then kept as the output's local copy (``stage.published``)."""
    client = client or s3.make_client()
    check_bucket(client, output_prefix(uri)[0], uri, "write the output")  # before the work
    cache = outputs_cache()
    cache.mkdir(parents=True, exist_ok=True)
    with local.staging(cache, "output") as tmp:
        stage = Stage(tmp)
        yield stage
        index = publish(tmp, uri, client=client)
        stage.published = cached_copy(index)
        local.replace(tmp, stage.published)


@contextlib.contextmanager
def staged_output(dest: str | os.PathLike, *, client: BaseClient | None = None) -> Iterator[Path]:
    """A local folder to write an output into, published to ``dest`` on success only."""
    if is_s3_uri(str(dest)):
        with staged_remote(str(dest), client=client) as stage:
            yield stage.folder
        return
    final = Path(dest).expanduser()
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the folder of the output {final}: {exc}") from None
    if final.exists() and not final.is_dir():
        raise UserError(f"output {final} is a file: give a folder path")
    with local.staging(final.parent, final.name) as tmp:
        yield tmp
        local.replace(tmp, final)


# ---------------------------------------------------------------------------- publish


def publish(
    folder: str | os.PathLike,
    uri: str,
    *,
    client: BaseClient | None = None,
    stale_after: float = STALE_SECONDS,
) -> dict:
    """Upload a finished output folder to ``uri`` and write its index last; return the
    index (``{"format": 1, "files": {path: {"sha256", "size"}}}``). An earlier output
    stays readable until the new one is complete (see the module docstring); staged
    objects of killed publishes older than ``stale_after`` seconds are removed."""
    folder = Path(folder)
    bucket, prefix = output_prefix(uri)
    if (folder / INDEX_NAME).exists():
        raise FcptsError(f"output folder {folder} holds a file named {INDEX_NAME}: fcpts writes it")
    client = client or s3.make_client()
    try:
        previous = read_index(uri, client=client)
    except UserError:  # none, or one that is not ours: the new output replaces it
        previous = None
    _remove_abandoned(client, bucket, prefix, previous, stale_after)
    if previous is None:
        written = s3.upload(folder, _folder_uri(bucket, prefix), client=client)
        index = _index(folder, prefix, written, prefix)
        _write_index(client, bucket, prefix, index)
        return index
    stage = _key(prefix, f"{s3.STAGING_MARKER}{uuid.uuid4().hex}")
    staged = s3.upload(folder, _folder_uri(bucket, stage), client=client)
    _write_index(client, bucket, prefix, _index(folder, prefix, staged, stage))
    for key, sha in sorted(staged.items()):
        s3.copy_object(client, bucket, key, _key(prefix, key[len(stage) + 1 :]), sha)
    index = _index(
        folder, prefix, {_key(prefix, k[len(stage) + 1 :]): v for k, v in staged.items()}, prefix
    )
    _write_index(client, bucket, prefix, index)
    keep = {_key(prefix, rel) for rel in index["files"]}
    for key in sorted((_keys_of(previous, prefix) | set(staged)) - keep):
        s3.delete_quietly(client, bucket, key)
    return index


def _folder_uri(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"


def _index(folder: Path, prefix: str, written: Mapping[str, str], base: str) -> dict:
    """The index of the objects ``written`` ({key: sha256}) under ``base``, a folder
    below ``prefix`` (or the prefix itself)."""
    files = {}
    for key, sha in sorted(written.items()):
        rel = key[len(base) + 1 :] if base else key
        entry: dict[str, Any] = {"sha256": sha, "size": (folder / rel).stat().st_size}
        if base != prefix:
            entry["object"] = key[len(prefix) + 1 :] if prefix else key
        files[rel] = entry
    return {"format": INDEX_FORMAT, "files": files}


def _write_index(client: BaseClient, bucket: str, prefix: str, index: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="fcpts-index-") as tmp:
        path = Path(tmp, INDEX_NAME)
        path.write_text(json.dumps(index, indent=1, sort_keys=True))
        s3.upload(path, object_uri(bucket, _key(prefix, INDEX_NAME)), client=client)


def _keys_of(index: Mapping[str, Any] | None, prefix: str) -> set[str]:
    """Every key an output may occupy: its objects and the plain keys of its files."""
    if index is None:
        return set()
    keys = set()
    for rel, meta in index["files"].items():
        keys.add(_key(prefix, rel))
        keys.add(_key(prefix, meta.get("object", rel)))
    return keys


def _remove_abandoned(
    client: BaseClient, bucket: str, prefix: str, current: Mapping | None, stale_after: float
) -> None:
    """Delete the staged and temporary objects under the prefix that the current index
    does not name and that are older than ``stale_after`` seconds (a killed publish's)."""
    uri = _folder_uri(bucket, prefix)
    named = _keys_of(current, prefix)
    now = time.time()
    below = f"{prefix}/" if prefix else ""
    for obj in s3.list_objects(client, bucket, below, uri, "publish the output to"):
        key = obj["Key"]
        ours = s3.STAGING_MARKER in key or s3.TMP_MARKER in key
        if ours and key not in named and now - obj["LastModified"].timestamp() >= stale_after:
            s3.delete_quietly(client, bucket, key)


# ------------------------------------------------------------------------------- read


def read_index(uri: str, *, client: BaseClient | None = None) -> dict[str, Any]:
    """The index of a published S3 output; a UserError when there is none (incomplete)
    or when it is not a valid index."""
    bucket, prefix = output_prefix(uri)
    client = client or s3.make_client()
    index_key = _key(prefix, INDEX_NAME)
    if head(client, bucket, index_key, "read") is None:
        check_bucket(client, bucket, uri, "read the output")
        raise UserError(
            f"{uri} is not a complete fcpts output: it has no {INDEX_NAME} (the step that "
            "writes it did not finish); run that step again"
        )
    with tempfile.TemporaryDirectory(prefix="fcpts-index-") as tmp:
        text = s3.download(object_uri(bucket, index_key), tmp, client=client).read_text()
    return read_index_text(text, object_uri(bucket, index_key))


def fetch_output(
    uri: str | os.PathLike,
    local_dir: str | os.PathLike | None = None,
    *,
    client: BaseClient | None = None,
) -> Path:
    """The local folder of a published output.

    A local path is returned as it is (``staged_output`` made it whole or absent). An S3
    output is downloaded into ``local_dir`` (replaced if present), or into the cache when
    ``local_dir`` is None, every file checked against the sha256 in the index.
    """
    if not is_s3_uri(str(uri)):
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise UserError(f"output {uri} does not exist: run the step that writes it first")
        return path
    uri = str(uri)
    bucket, prefix = output_prefix(uri)
    client = client or s3.make_client()
    index = read_index(uri, client=client)
    final = cached_copy(index) if local_dir is None else Path(local_dir).expanduser()
    if local_dir is None and final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with local.staging(final.parent, final.name) as tmp:
        for rel, meta in sorted(index["files"].items()):
            target = tmp.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            key = _key(prefix, meta.get("object", rel))
            got = s3.download(object_uri(bucket, key), target.parent, client=client)
            if got != target:
                os.replace(got, target)
            s3.check_sha(meta["sha256"], sha256_file(target), _shown(uri, rel), "its content")
        local.replace(tmp, final)
    return final


def _shown(uri: str, rel: str) -> str:
    return f"{uri.rstrip('/')}/{rel}"
