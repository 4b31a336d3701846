"""Remote storage for models and artifacts (S3 and S3-compatible stores)."""

from fcpts.storage.s3 import download, parse_s3_uri, upload, verify

__all__ = ["download", "parse_s3_uri", "upload", "verify"]
