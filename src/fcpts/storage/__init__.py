"""Remote storage for models and artifacts (S3 and S3-compatible stores).

* :mod:`fcpts.storage.s3`: describe, download, upload (whole or absent), verify.
* :mod:`fcpts.storage.s3errors`: boto3 errors as fcpts errors naming the URI.
* :mod:`fcpts.storage.cache`: ``fetch(uri)``, S3 sources cached on local disk per version.
* :mod:`fcpts.storage.outputs`: ``staged_output(dest)`` and ``fetch_output(uri)``, step
  outputs that are whole or absent, locally or in S3; :mod:`fcpts.storage.index` checks
  an S3 output's index.
* :mod:`fcpts.storage.local`: locked staging folders that killed runs cannot leave behind.
"""

from fcpts.storage.cache import fetch, is_s3_uri
from fcpts.storage.outputs import fetch_output, staged_output
from fcpts.storage.s3 import download, parse_s3_uri, upload, verify

__all__ = [
    "download",
    "fetch",
    "fetch_output",
    "is_s3_uri",
    "parse_s3_uri",
    "staged_output",
    "upload",
    "verify",
]
