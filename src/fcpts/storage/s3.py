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
* Errors name the URI and what to fix: ``UserError`` for mistakes the user can fix (bad
  URI, missing bucket or key, wrong credentials), ``ServiceError`` for an endpoint that
  cannot be reached, ``FcptsError`` for a checksum mismatch.

boto3 is imported inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import posixpath
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcpts.errors import FcptsError, ServiceError, UserError

if TYPE_CHECKING:
    from botocore.client import BaseClient

log = logging.getLogger(__name__)

TMP_MARKER = ".fcpts-tmp-"
SHA256_METADATA_KEY = "sha256"
MB = 1024 * 1024
DEFAULT_MULTIPART_THRESHOLD = 8 * MB
DEFAULT_MULTIPART_CHUNKSIZE = 8 * MB
# A down endpoint must fail fast: 3 attempts (standard-mode backoff of at most 1 s and
# 2 s between them) with a 3 s connect timeout give up within about 12 s.
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_READ_TIMEOUT = 60.0

_URI_RE = re.compile(r"^s3://(?P<bucket>[^/]*)(?:/(?P<key>.*))?$", re.DOTALL)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1024 * 1024


# ------------------------------------------------------------------------------- URIs


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; key may be "" or end with "/"."""
    if not isinstance(uri, str):
        raise UserError(f"an S3 URI must be a string like s3://BUCKET/KEY, got {uri!r}")
    m = _URI_RE.match(uri.strip())
    if not m:
        raise UserError(f"not an S3 URI: {uri!r}; write it as s3://BUCKET/KEY")
    bucket, key = m.group("bucket"), m.group("key") or ""
    if not bucket:
        raise UserError(f"S3 URI {uri!r} has no bucket; write it as s3://BUCKET/KEY")
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise UserError(
            f"S3 URI {uri!r}: {bucket!r} is not a valid bucket name (3-255 characters: "
            "letters, digits, '.', '-', '_'; starting and ending with a letter or digit)"
        )
    if key.startswith("/"):
        raise UserError(f"S3 URI {uri!r}: the key starts with '/'; write s3://{bucket}/KEY")
    return bucket, key


def _uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


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


def _endpoint_source(endpoint: str | None) -> str:
    if os.environ.get("AWS_ENDPOINT_URL_S3"):
        src = "the environment variable AWS_ENDPOINT_URL_S3"
    elif os.environ.get("AWS_ENDPOINT_URL"):
        src = "the environment variable AWS_ENDPOINT_URL"
    else:
        src = (
            "the AWS config (endpoint_url in ~/.aws/config) or the region's default "
            "AWS endpoint; set AWS_ENDPOINT_URL_S3 for MinIO or another S3-compatible store"
        )
    return f"endpoint {endpoint} (from {src})"


# ----------------------------------------------------------------------------- errors


def _unwrap(exc: BaseException) -> BaseException:
    """The botocore error inside boto3's transfer wrappers (S3UploadFailedError, ...)."""
    from boto3.exceptions import RetriesExceededError, S3UploadFailedError

    for _ in range(3):
        if isinstance(exc, RetriesExceededError) and exc.last_exception is not None:
            exc = exc.last_exception
        elif isinstance(exc, S3UploadFailedError) and (exc.__cause__ or exc.__context__):
            exc = exc.__cause__ or exc.__context__
        else:
            break
    return exc


def _is_connection_error(exc: BaseException) -> bool:
    """The endpoint could not be reached or the connection broke (not a refusal)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    return isinstance(
        _unwrap(exc),
        (
            BotoConnectionError,
            ReadTimeoutError,
            ResponseStreamingError,
            IncompleteReadError,
            ProtocolError,
            ConnectionError,  # the builtin one: reset, refused, broken pipe
            TimeoutError,
        ),
    )


def _never_reached(exc: BaseException) -> bool:
    """Nothing reached the server (so nothing can have been written)."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return isinstance(_unwrap(exc), (EndpointConnectionError, ConnectTimeoutError))


def _translate(exc: BaseException, client: BaseClient, uri: str, action: str) -> BaseException:
    """The fcpts error for a boto3/botocore exception (other exceptions unchanged)."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, FcptsError):
        return exc
    exc = _unwrap(exc)
    endpoint = client.meta.endpoint_url
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if _is_connection_error(exc):
        what = "cannot reach" if _never_reached(exc) else "lost the connection to"
        return ServiceError(
            f"cannot {action} {uri}: {what} the S3 {_endpoint_source(endpoint)}: "
            f"{exc}. Check that the endpoint is right and the service is up."
        )
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return UserError(
            f"cannot {action} {uri}: no AWS credentials ({exc}); set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"
        )
    if isinstance(exc, OSError):  # local file trouble: vanished, unreadable, disk full
        return FcptsError(f"cannot {action} {uri}: {exc}")
    if not isinstance(exc, ClientError):
        return exc
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    message = err.get("Message") or ""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if code == "NoSuchBucket":
        return UserError(
            f"cannot {action} {uri}: bucket {bucket!r} does not exist at {endpoint}; "
            "create it or fix the bucket name in the URI"
        )
    if code in ("NoSuchKey", "404", "NotFound"):
        return UserError(f"cannot {action} {uri}: no such object; check the key")
    if code == "InvalidAccessKeyId":
        return UserError(
            f"cannot {action} {uri}: {endpoint} does not know the access key; fix "
            "AWS_ACCESS_KEY_ID (or the profile in AWS_PROFILE / ~/.aws/credentials)"
        )
    if code == "SignatureDoesNotMatch":
        return UserError(
            f"cannot {action} {uri}: the secret key does not match the access key at "
            f"{endpoint}; fix AWS_SECRET_ACCESS_KEY (or the profile in AWS_PROFILE)"
        )
    if code in ("InvalidToken", "ExpiredToken", "TokenRefreshRequired"):
        return UserError(
            f"cannot {action} {uri}: the session token was refused ({code}); refresh "
            "AWS_SESSION_TOKEN or the profile's credentials"
        )
    if status == 403 or code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
        return UserError(
            f"cannot {action} {uri}: access denied by {endpoint} ({code or status}); the "
            "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) are wrong "
            "or lack permission for this bucket"
        )
    if code in ("PreconditionFailed", "412"):
        return ServiceError(f"cannot {action} {uri}: the object changed meanwhile; retry")
    return ServiceError(
        f"cannot {action} {uri}: S3 at {endpoint} answered {code or status}: {message}".rstrip(": ")
    )


@contextlib.contextmanager
def _errors(client: BaseClient, uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FcptsError:
        raise
    except Exception as e:
        new = _translate(e, client, uri, action)
        if new is e:
            raise
        raise new from e


def nothing_to_download(uri: str, bucket: str, key: str, prefix: str) -> UserError:
    """The error for an S3 URI with neither an object at ``key`` nor objects under ``prefix``."""
    if key and not key.endswith("/"):
        return UserError(
            f"cannot download {uri}: no object has this key and no objects are under "
            f"s3://{bucket}/{prefix}; check the key"
        )
    return UserError(f"cannot download {uri}: no objects under this prefix; check the key")


def _missing_object_error(client: BaseClient, bucket: str, key: str, action: str) -> UserError:
    """Missing bucket or missing key? (A HEAD 404 does not say which.)"""
    uri = _uri(bucket, key)
    from botocore.exceptions import ClientError

    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as e:
        if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket"):
            return UserError(
                f"cannot {action} {uri}: bucket {bucket!r} does not exist at "
                f"{client.meta.endpoint_url}; create it or fix the bucket name in the URI"
            )
        raise _translate(e, client, uri, action) from e
    except Exception as e:
        new = _translate(e, client, uri, action)
        if new is e:
            raise
        raise new from e
    return UserError(f"cannot {action} {uri}: no such object; check the key")


def _head(client: BaseClient, bucket: str, key: str, action: str) -> dict | None:
    """head_object, or None when no object has this key."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return None
        if code in ("403", "Forbidden"):
            # A HEAD response has no body, so no error code: ask again with a GET to
            # tell a wrong access key from a wrong secret from a missing permission.
            try:
                client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
            except ClientError as e2:
                raise _translate(e2, client, _uri(bucket, key), action) from e
        raise _translate(e, client, _uri(bucket, key), action) from e
    except Exception as e:
        new = _translate(e, client, _uri(bucket, key), action)
        if new is e:
            raise
        raise new from e


# ----------------------------------------------------------------------------- hashes


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a local file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _check_sha(expected: str | None, actual: str, uri: str, what: str) -> None:
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
    bucket, key = parse_s3_uri(uri)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    client = client or make_client()
    tc = _transfer_config(multipart_threshold, multipart_chunksize)
    action = "download"

    if key and not key.endswith("/"):
        head = _head(client, bucket, key, action)
        if head is not None:
            target = dest_dir / posixpath.basename(key)
            _download_object(client, bucket, key, head, target, tc)
            return target
        prefix = key + "/"
    else:
        prefix = key

    keys = [
        k
        for k in _list_keys(client, bucket, prefix, uri, action)
        if not k.endswith("/") and TMP_MARKER not in k
    ]
    if not keys:
        raise nothing_to_download(uri, bucket, key, prefix)

    name = posixpath.basename(prefix.rstrip("/")) or bucket
    final = dest_dir / name
    tmp = dest_dir / f".{name}{TMP_MARKER}{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for k in keys:
            rel = k[len(prefix) :]
            parts = rel.split("/")
            if any(p in ("", ".", "..") for p in parts):
                raise FcptsError(
                    f"refusing to download s3://{bucket}/{k}: its path below {uri} "
                    f"({rel!r}) is empty or leaves the destination folder"
                )
            head = _head(client, bucket, k, action)
            if head is None:  # deleted since it was listed
                raise ServiceError(f"s3://{bucket}/{k} disappeared during download; retry")
            target = tmp.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            _download_object(client, bucket, k, head, target, tc)
        _replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _list_keys(
    client: BaseClient, bucket: str, prefix: str, uri: str, action: str
) -> Iterator[str]:
    with _errors(client, uri, action):
        paginator = client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                yield obj["Key"]


def _download_object(
    client: BaseClient, bucket: str, key: str, head: dict, target: Path, tc
) -> None:
    uri = _uri(bucket, key)
    if target.is_dir():
        raise UserError(f"cannot download {uri} to {target}: a folder has that name")
    tmp = target.parent / f".{target.name}{TMP_MARKER}{uuid.uuid4().hex}"
    try:
        with _errors(client, uri, "download"):
            # s3transfer pins the ETag of its own HEAD (IfMatch) across ranged GETs.
            client.download_file(bucket, key, str(tmp), Config=tc)
        expected = (head.get("Metadata") or {}).get(SHA256_METADATA_KEY)
        try:
            _check_sha(expected, sha256_file(tmp), uri, "the sha256 of the downloaded data")
        except FcptsError:
            now = _head(client, bucket, key, "download")
            if now is None or now.get("ETag") != head.get("ETag"):
                raise ServiceError(f"{uri} was replaced during the download; retry") from None
            raise
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _replace(src: Path, dst: Path) -> None:
    """Rename src to dst, removing what dst was (a rename cannot replace a folder)."""
    if dst.is_dir() and not dst.is_symlink():
        old = dst.parent / f".{dst.name}{TMP_MARKER}old-{uuid.uuid4().hex}"
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


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


def _upload_object(client: BaseClient, path: Path, bucket: str, key: str, tc) -> str:
    uri = _uri(bucket, key)
    try:
        before = path.stat()
        digest = sha256_file(path)
    except OSError as e:
        raise UserError(f"cannot upload {path} to {uri}: {e}") from e
    metadata = {SHA256_METADATA_KEY: digest}
    tmp_key = f"{key}{TMP_MARKER}{uuid.uuid4().hex}"
    uploaded = False
    try:
        with _errors(client, uri, "upload"):
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
            client.copy(
                {"Bucket": bucket, "Key": tmp_key},
                bucket,
                key,
                ExtraArgs={"Metadata": metadata, "MetadataDirective": "REPLACE"},
                Config=tc,
            )
    except BaseException as e:
        # A PUT is atomic and s3transfer aborts a failed multipart upload, so a failed
        # transfer leaves a temporary object only when the server completed it and the
        # answer was lost. Don't clean up after a refusal (ClientError) or an endpoint
        # that was never reached: nothing was written, and a dead endpoint would only
        # make us wait a second time.
        from botocore.exceptions import ClientError

        cause = _unwrap(e.__cause__ or e) if isinstance(e, FcptsError) else _unwrap(e)
        if uploaded or not (isinstance(cause, ClientError) or _never_reached(cause)):
            _delete_quietly(client, bucket, tmp_key)
        raise
    _delete_quietly(client, bucket, tmp_key)
    return digest


def _delete_quietly(client: BaseClient, bucket: str, key: str) -> None:
    try:
        client.delete_object(Bucket=bucket, Key=key)
    except Exception as e:  # the final object is fine; a stray temp key is only litter
        log.warning("could not delete the temporary object s3://%s/%s: %s", bucket, key, e)


# ----------------------------------------------------------------------------- verify


def verify(uri: str, expected_sha256: str, *, client: BaseClient | None = None) -> str:
    """Check that the object at uri has the given sha256; return it.

    Compares the ``sha256`` metadata when present (cheap, fails early), then streams the
    object and hashes its content. Raises ``FcptsError`` on mismatch, ``UserError`` for a
    missing bucket or object.
    """
    bucket, key = parse_s3_uri(uri)
    expected = str(expected_sha256).strip().lower()
    if not _SHA256_RE.match(expected):
        raise UserError(f"not a sha256 (64 hex digits): {expected_sha256!r}")
    if not key or key.endswith("/"):
        raise UserError(f"cannot verify {uri}: it names a folder; give the URI of an object")
    client = client or make_client()
    head = _head(client, bucket, key, "verify")
    if head is None:
        raise _missing_object_error(client, bucket, key, "verify")
    meta_sha = (head.get("Metadata") or {}).get(SHA256_METADATA_KEY)
    if meta_sha is not None and meta_sha.lower() != expected:
        raise FcptsError(
            f"sha256 mismatch for {uri}: its sha256 metadata is {meta_sha.lower()} but "
            f"{expected} was expected"
        )
    h = hashlib.sha256()
    with _errors(client, uri, "verify"):
        body = client.get_object(Bucket=bucket, Key=key, IfMatch=head["ETag"])["Body"]
        try:
            for chunk in body.iter_chunks(_CHUNK):
                h.update(chunk)
        finally:
            body.close()
    actual = h.hexdigest()
    _check_sha(expected, actual, uri, "the sha256 of its content")
    return actual
