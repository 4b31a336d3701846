"""S3 URIs, keys and listings: what an ``s3://`` URI names, read once.

:func:`describe` turns a URI into a :class:`Listing` (one object, or the finished objects
under a prefix, each with its path below the prefix and its version), so a download,
the cache and its change check all work from the same answer.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fcpts.errors import UserError
from fcpts.storage.local import TMP_MARKER
from fcpts.storage.s3errors import errors, head, nothing_to_download, object_uri

if TYPE_CHECKING:
    from botocore.client import BaseClient

STAGING_MARKER = ".fcpts-staging-"  # a republished output's objects until its index moves
SHA256_METADATA_KEY = "sha256"
_URI_RE = re.compile(r"^s3://(?P<bucket>[^/]*)(?:/(?P<key>.*))?$", re.DOTALL)
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,253}[A-Za-z0-9]$")


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


def relative_key(prefix: str, key: str, uri: str) -> str:
    """``key`` below ``prefix``; a UserError when it would leave the folder."""
    rel = key[len(prefix) :]
    if not key.startswith(prefix) or any(p in ("", ".", "..") for p in rel.split("/")):
        bucket = uri[len("s3://") :].split("/", 1)[0]
        raise UserError(
            f"refusing to download s3://{bucket}/{key}: its path below {uri} ({rel!r}) is "
            "empty or leaves the folder; rename the object"
        )
    return rel


def is_transient(key: str) -> bool:
    """A folder marker, or an object fcpts has not finished writing (temporary keys,
    the staged objects of an output being republished)."""
    return key.endswith("/") or TMP_MARKER in key or STAGING_MARKER in key


@dataclass(frozen=True)
class Listing:
    """What an S3 URI names, read once: one object or the objects under a prefix.

    ``source`` is the URI to download (a folder's ends with "/"), ``name`` the local name
    of the file or folder, ``objects`` the (key, path below the prefix, version) of every
    object in key order, ``heads`` the head_object answer of a single object."""

    uri: str
    bucket: str
    prefix: str
    kind: str
    name: str
    objects: tuple[tuple[str, str, str], ...]
    heads: Mapping[str, dict]

    @property
    def source(self) -> str:
        return self.uri if self.kind == "file" else object_uri(self.bucket, self.prefix)

    @property
    def versions(self) -> list[tuple[str, str]]:
        """(path below the prefix, version) of every object, sorted."""
        return sorted((rel, version) for _, rel, version in self.objects)


def _version(head_answer: Mapping) -> str:
    sha = (head_answer.get("Metadata") or {}).get(SHA256_METADATA_KEY)
    return f"sha256:{sha}" if sha else f"etag:{str(head_answer.get('ETag', '')).strip(chr(34))}"


def list_objects(
    client: BaseClient, bucket: str, prefix: str, uri: str, action: str = "download"
) -> Iterator[dict]:
    """The list_objects_v2 entries under prefix (errors name ``uri`` and ``action``)."""
    with errors(client, uri, action):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            yield from page.get("Contents", [])


def describe(client: BaseClient, uri: str) -> Listing:
    """The object at ``uri``, else the finished objects under ``uri`` as a prefix (a URI
    ending with "/" is always a prefix); a UserError when there is neither."""
    uri = uri.strip()
    bucket, key = parse_s3_uri(uri)
    if key and not key.endswith("/"):
        answer = head(client, bucket, key, "download")
        if answer is not None:
            name = posixpath.basename(key)
            return Listing(
                uri, bucket, key, "file", name, ((key, "", _version(answer)),), {key: answer}
            )
        prefix = key + "/"
    else:
        prefix = key
    objects = []
    for obj in list_objects(client, bucket, prefix, uri):
        if not is_transient(obj["Key"]):
            rel = relative_key(prefix, obj["Key"], uri)
            etag = str(obj["ETag"]).strip(chr(34))
            objects.append((obj["Key"], rel, f"etag:{etag}:{obj['Size']}"))
    if not objects:
        raise nothing_to_download(uri, bucket, key, prefix)
    name = posixpath.basename(prefix.rstrip("/")) or bucket
    return Listing(uri, bucket, prefix, "folder", name, tuple(sorted(objects)), {})
