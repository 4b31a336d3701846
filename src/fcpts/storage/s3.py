"""S3 (and S3-compatible: MinIO, moto, Ceph) downloads and uploads through boto3.

Endpoint, region and credentials come from the standard AWS environment and config
files, so ``AWS_ENDPOINT_URL_S3`` points everything at a MinIO or moto server; the
functions also take an explicit ``client`` (see ``make_client``).

Guarantees:

* ``download`` writes to a temporary name next to the destination and renames it when
  complete and verified, so a partial download never sits under the final name.
* ``upload`` puts each object under a temporary key (``<key>.fcpts-tmp-<uuid>``), copies
  it server-side to the final key and deletes the temporary key, so an object under the
  final key is whole or absent. Each object carries its sha256 as the user metadata
  ``sha256``; ``download`` and ``verify`` check it.
* Errors name the URI and what to fix (see :mod:`fcpts.storage.s3errors`).

boto3 is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcpts.digests import CHUNK, sha256_file
from fcpts.errors import FcptsError, ServiceError, UserError
from fcpts.storage import local
from fcpts.storage.local import TMP_MARKER
from fcpts.storage.s3errors import (
    errors,
    head,
    missing_object_error,
    never_reached,
    object_uri,
    unwrap,
)
from fcpts.storage.s3keys import (
    SHA256_METADATA_KEY,
    STAGING_MARKER,
    Listing,
    describe,
    list_objects,
    parse_s3_uri,
)

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

# used as s3.<name> by the other storage modules and the tests
__all__ = [
    "SHA256_METADATA_KEY",
    "STAGING_MARKER",
    "TMP_MARKER",
    "check_sha",
    "copy_object",
    "delete_quietly",
    "describe",
    "download",
    "download_listing",
    "list_objects",
    "make_client",
    "parse_s3_uri",
    "sha256_file",
    "upload",
    "verify",
]

MB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 8 * MB
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MB
# A down endpoint must fail fast: 3 attempts (standard-mode backoff of at most 1 s and
# 2 s between them) with a 3 s connect timeout give up within about 12 s.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 60.0

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# ----------------------------------------------------------------------------- client


def make_client(
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    **client_kwargs: Any,
) -> BaseClient:
    """A boto3 S3 client configured from the standard AWS environment and config files
    (``AWS_ENDPOINT_URL_S3``, ``AWS_DEFAULT_REGION``, ``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``,
    ...), with bounded retries. ``client_kwargs`` go to ``boto3.client`` (e.g.
    ``endpoint_url``, ``aws_access_key_id``)."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client("s3", config=config, **client_kwargs)


def _transfer_config(threshold: int, chunksize: int):
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=threshold, multipart_chunksize=chunksize)


def check_sha(expected: str | None, actual: str, uri: str, what: str) -> None:
    if expected is not None and expected.lower() != actual:
        raise FcptsError(
            f"sha256 mismatch for {uri}: {what} is {actual} but {expected.lower()} was "
            "expected; the object is corrupt or its metadata was written by another tool"
        )


# --------------------------------------------------------------------------- download


def download(
    uri: str,
    dest_dir: str | os.PathLike,
    *,
    client: BaseClient | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
) -> Path:
    """Download an object or a folder (prefix) into dest_dir; return the local path.

    * ``s3://b/dir/model.bin`` (an object) -> ``dest_dir/model.bin``.
    * ``s3://b/dir/`` or ``s3://b/dir`` when no object has the key ``dir`` but objects
      exist under ``dir/`` -> the folder ``dest_dir/dir`` with the same relative paths.
      ``s3://b`` or ``s3://b/`` -> ``dest_dir/b``.

    Objects with a ``sha256`` metadata are checked after download (``FcptsError`` on
    mismatch). Everything is written under a temporary name and renamed when complete;
    an existing file or folder under the final name is replaced.
    """
    client = client or make_client()
    listing = describe(client, uri)
    return download_listing(
        client, listing, dest_dir, _transfer_config(multipart_threshold, multipart_chunksize)
    )


def download_listing(
    client: BaseClient, listing: Listing, dest_dir: str | os.PathLike, tc: Any = None
) -> Path:
    """Download exactly the objects of ``listing`` into ``dest_dir`` (see :func:`download`)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    tc = tc or _transfer_config(DEFAULT_MULTIPART_THRESHOLD, DEFAULT_MULTIPART_CHUNKSIZE)
    if listing.kind == "file":
        key = listing.prefix
        target = dest_dir / listing.name
        _download_object(client, listing.bucket, key, listing.heads[key], target, tc)
        return target
    final = dest_dir / listing.name
    with local.staging(dest_dir, listing.name) as tmp:
        for key, rel, _ in listing.objects:
            answer = head(client, listing.bucket, key, "download")
            if answer is None:  # deleted since it was listed
                raise ServiceError(
                    f"{object_uri(listing.bucket, key)} disappeared during download; retry"
                )
            target = tmp.joinpath(*rel.split("/"))
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_object(client, listing.bucket, key, answer, target, tc)
        local.replace(tmp, final)
    return final


def _download_object(
    client: BaseClient, bucket: str, key: str, answer: dict, target: Path, tc
) -> None:
    uri = object_uri(bucket, key)
    if target.is_dir():
        raise UserError(f"cannot download {uri} to {target}: a folder has that name")
    tmp = target.parent / f".{target.name}{TMP_MARKER}{uuid.uuid4().hex}"
    try:
        with errors(client, uri, "download"):
            # s3transfer pins the ETag of its own HEAD (IfMatch) across ranged GETs.
            client.download_file(bucket, key, str(tmp), Config=tc)
        expected = (answer.get("Metadata") or {}).get(SHA256_METADATA_KEY)
        try:
            check_sha(expected, sha256_file(tmp), uri, "the sha256 of the downloaded data")
        except FcptsError:
            now = head(client, bucket, key, "download")
            if now is None or now.get("ETag") != answer.get("ETag"):
                raise ServiceError(f"{uri} was replaced during the download; retry") from None
            raise
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# ----------------------------------------------------------------------------- upload


def upload(
    path: str | os.PathLike,
    uri: str,
    *,
    client: BaseClient | None = None,
    multipart_threshold: int = DEFAULT_MULTIPART_THRESHOLD,
    multipart_chunksize: int = DEFAULT_MULTIPART_CHUNKSIZE,
) -> dict[str, str]:
    """Upload a file or a folder; return ``{key: sha256}`` of every object written.

    * A file goes to the key of the URI, or to ``<prefix>/<file name>`` when the URI ends
      with "/" (or is just ``s3://bucket``).
    * A folder's files go under the URI's key as a prefix, with their relative paths.

    Each object is whole or absent under its final key (temporary key, then server-side
    copy); a folder upload that fails midway leaves the objects it finished.
    """
    path = Path(path)
    bucket, key = parse_s3_uri(uri)
    if not path.exists():
        raise UserError(f"cannot upload {path} to {uri}: no such file or folder")
    if path.is_dir():
        base = key.rstrip("/")
        pairs = []
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                p = Path(root, name)
                if not p.is_file():  # broken symlink, socket, ...
                    continue
                rel = p.relative_to(path).as_posix()
                pairs.append((p, f"{base}/{rel}" if base else rel))
    else:
        if not key or key.endswith("/"):
            key += path.name
        pairs = [(path, key)]
    client = client or make_client()
    tc = _transfer_config(multipart_threshold, multipart_chunksize)
    return {k: _upload_object(client, p, bucket, k, tc) for p, k in pairs}


def copy_object(
    client: BaseClient, bucket: str, source: str, key: str, sha256: str, tc: Any = None
) -> None:
    """Server-side copy of ``source`` to ``key``, with ``sha256`` as its metadata."""
    tc = tc or _transfer_config(DEFAULT_MULTIPART_THRESHOLD, DEFAULT_MULTIPART_CHUNKSIZE)
    with errors(client, object_uri(bucket, key), "upload"):
        client.copy(
            {"Bucket": bucket, "Key": source},
            bucket,
            key,
            ExtraArgs={"Metadata": {SHA256_METADATA_KEY: sha256}, "MetadataDirective": "REPLACE"},
            Config=tc,
        )


def _upload_object(client: BaseClient, path: Path, bucket: str, key: str, tc) -> str:
    uri = object_uri(bucket, key)
    try:
        before = path.stat()
        digest = sha256_file(path)
    except OSError as e:
        raise UserError(f"cannot upload {path} to {uri}: {e}") from e
    metadata = {SHA256_METADATA_KEY: digest}
    tmp_key = f"{key}{TMP_MARKER}{uuid.uuid4().hex}"
    uploaded = False
    try:
        with errors(client, uri, "upload"):
            client.upload_file(
                str(path), bucket, tmp_key, ExtraArgs={"Metadata": metadata}, Config=tc
            )
            uploaded = True
            after = path.stat()
            if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                raise FcptsError(
                    f"{path} changed while it was uploaded to {uri}; nothing was written "
                    "under that key. Upload it again once the file is complete."
                )
        copy_object(client, bucket, tmp_key, key, digest, tc)
    except BaseException as e:
        # A PUT is atomic and s3transfer aborts a failed multipart upload, so a failed
        # transfer leaves a temporary object only when the server completed it and the
        # answer was lost. Don't clean up after a refusal (ClientError) or an endpoint
        # that was never reached: nothing was written, and a dead endpoint would only
        # make us wait a second time.
        from botocore.exceptions import ClientError

        cause = unwrap(e.__cause__ or e) if isinstance(e, FcptsError) else unwrap(e)
        if uploaded or not (isinstance(cause, ClientError) or never_reached(cause)):
            delete_quietly(client, bucket, tmp_key)
        raise
    delete_quietly(client, bucket, tmp_key)
    return digest


def delete_quietly(client: BaseClient, bucket: str, key: str) -> None:
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:  # what was to be kept is fine; a stray object is only litter
        log.warning("could not delete the object s3://%s/%s: %s", bucket, key, e)


# ----------------------------------------------------------------------------- verify


def verify(uri: str, expected_sha256: str, *, client: BaseClient | None = None) -> str:
    """Check that the object at uri has the given sha256; return it.

    Compares the ``sha256`` metadata when present (cheap, fails early), then streams the
    object and hashes its content. Raises ``FcptsError`` on mismatch, ``UserError`` for a
    missing bucket or object.
    """
    bucket, key = parse_s3_uri(uri)
    expected = str(expected_sha256).strip().lower()
    if not SHA256_RE.match(expected):
        raise UserError(f"not a sha256 (64 hex digits): {expected_sha256!r}")
    if not key or key.endswith("/"):
        raise UserError(f"cannot verify {uri}: it names a folder; give the URI of an object")
    client = client or make_client()
    answer = head(client, bucket, key, "verify")
    if answer is None:
        raise missing_object_error(client, bucket, key, "verify")
    meta_sha = (answer.get("Metadata") or {}).get(SHA256_METADATA_KEY)
    if meta_sha is not None and meta_sha.lower() != expected:
        raise FcptsError(
            f"sha256 mismatch for {uri}: its sha256 metadata is {meta_sha.lower()} but "
            f"{expected} was expected"
        )
    h = hashlib.sha256()
    with errors(client, uri, "verify"):
        body = client.get_object(Bucket=bucket, Key=key, IfMatch=answer["ETag"])["Body"]
        try:
            for chunk in body.iter_chunks(CHUNK):
                h.update(chunk)
        finally:
            body.close()
    actual = h.hexdigest()
    check_sha(expected, actual, uri, "the sha256 of its content")
    return actual
