"""boto3 and botocore exceptions as fcpts errors that name the URI and what to fix.

``UserError`` for mistakes the user can fix (bad URI, missing bucket or key, wrong
credentials), ``ServiceError`` for an endpoint that cannot be reached or a store that
changed meanwhile, ``FcptsError`` for local file trouble. botocore is imported inside
the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from fcpts.errors import FcptsError, ServiceError, UserError

if TYPE_CHECKING:
    from botocore.client import BaseClient


def object_uri(bucket: str, key: str) -> str:
    return f"s3://{bucket}/{key}"


def endpoint_source(endpoint: str | None) -> str:
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


def unwrap(exc: BaseException) -> BaseException:
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


def is_connection_error(exc: BaseException) -> bool:
    """The endpoint could not be reached or the connection broke (not a refusal)."""
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import (
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    return isinstance(
        unwrap(exc),
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


def never_reached(exc: BaseException) -> bool:
    """Nothing reached the server (so nothing can have been written)."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return isinstance(unwrap(exc), (EndpointConnectionError, ConnectTimeoutError))


def translate(exc: BaseException, client: BaseClient, uri: str, action: str) -> BaseException:
    """The fcpts error for a boto3/botocore exception (other exceptions unchanged)."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    if isinstance(exc, FcptsError):
        return exc
    exc = unwrap(exc)
    endpoint = client.meta.endpoint_url
    bucket = uri[len("s3://") :].split("/", 1)[0]
    if is_connection_error(exc):
        what = "cannot reach" if never_reached(exc) else "lost the connection to"
        return ServiceError(
            f"cannot {action} {uri}: {what} the S3 {endpoint_source(endpoint)}: "
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
def errors(client: BaseClient, uri: str, action: str) -> Iterator[None]:
    try:
        yield
    except FcptsError:
        raise
    except Exception as e:
        new = translate(e, client, uri, action)
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


def check_bucket(client: BaseClient, bucket: str, uri: str, action: str) -> None:
    """A UserError when the bucket does not exist (a HEAD 404 on a key does not say
    whether the bucket or the key is missing); other errors translated."""
    from botocore.exceptions import ClientError

    with errors(client, uri, action):
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as e:
            if str(e.response.get("Error", {}).get("Code", "")) in ("404", "NoSuchBucket"):
                raise UserError(
                    f"cannot {action} {uri}: bucket {bucket!r} does not exist at "
                    f"{client.meta.endpoint_url}; create it or fix the bucket name in the URI"
                ) from None
            raise


def missing_object_error(client: BaseClient, bucket: str, key: str, action: str) -> UserError:
    """Missing bucket (raised) or missing key (returned)?"""
    uri = object_uri(bucket, key)
    check_bucket(client, bucket, uri, action)
    return UserError(f"cannot {action} {uri}: no such object; check the key")


def head(client: BaseClient, bucket: str, key: str, action: str) -> dict | None:
    """head_object, or None when no object has this key."""
    from botocore.exceptions import ClientError

    with errors(client, object_uri(bucket, key), action):
        try:
            return client.head_object(Bucket=bucket, Key=key)
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            if code in ("403", "Forbidden"):
                # A HEAD response has no body, so no error code: ask again with a GET to
                # tell a wrong access key from a wrong secret from a missing permission.
                client.get_object(Bucket=bucket, Key=key, Range="bytes=0-0")["Body"].close()
            raise
