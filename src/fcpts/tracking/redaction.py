"""Credentials out of everything fcpts prints, logs, stores or passes on.

* :func:`redact`: a text with passwords in URIs, secret-looking query values and the values
  of secret-looking environment variables replaced by ``***``. The one redaction of fcpts:
  tracking stores, study databases and data sources all go through it.
* :func:`split_credentials`: a URI's userinfo moved into the environment variables its
  client reads (``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` or ``MLFLOW_TRACKING_TOKEN`` for an
  MLflow server, ``PGPASSWORD`` for PostgreSQL), so that what travels as an argument (a KFP
  parameter, a step's command line) is the URI without them.

No heavy imports: the sweep and the steps use it without loading MLflow.
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

REDACTED = "***"
TOKEN_LENGTH = 20  # a bare user name this long (https://TOKEN@host) is taken for a token

ENV_USERNAME = "MLFLOW_TRACKING_USERNAME"
ENV_PASSWORD = "MLFLOW_TRACKING_PASSWORD"
ENV_TOKEN = "MLFLOW_TRACKING_TOKEN"
ENV_PGPASSWORD = "PGPASSWORD"

_USERINFO_RE = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::[^/@\s]*)?@"
)
_SECRET_QUERY_RE = re.compile(
    r"(?i)([?&](?:x-amz-[a-z-]*|signature|sig|token|access_token|password|pwd|secret|key|"
    r"credential|se|sv|sp)=)[^&\s#]*"
)
_SECRET_ENV_RE = re.compile(
    r"(?i)(PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|ACCESS_KEY|API_KEY|PRIVATE)"
)


def secret_env_values() -> list[str]:
    """The values (4 characters or more) of environment variables whose names look secret,
    longest first."""
    values = [v for k, v in os.environ.items() if _SECRET_ENV_RE.search(k) and v and len(v) >= 4]
    return sorted(set(values), key=len, reverse=True)


def redact(text: Any) -> str:
    """``text`` as a string with credentials removed.

    ``scheme://user:password@host`` becomes ``scheme://user:***@host`` (a token-long
    bare user name, ``https://TOKEN@host``, becomes ``***``), secret-looking query values
    (``X-Amz-Signature=``, ``token=``, ...) become ``***``, and any value of an environment
    variable whose name looks secret (``*PASSWORD*``, ``*SECRET*``, ``*TOKEN*``,
    ``*ACCESS_KEY*``, ...) is replaced wherever it appears.
    """
    s = str(text)

    def userinfo(m: re.Match) -> str:
        had_password = ":" in m.group(0)[len(m.group("scheme")) :]
        user = m.group("user")
        if had_password:
            return f"{m.group('scheme')}{user}:{REDACTED}@"
        # a user name alone is no secret, unless it is a token (https://TOKEN@host)
        return f"{m.group('scheme')}{REDACTED}@" if len(user) >= TOKEN_LENGTH else m.group(0)

    s = _USERINFO_RE.sub(userinfo, s)
    s = _SECRET_QUERY_RE.sub(lambda m: m.group(1) + REDACTED, s)
    for value in secret_env_values():
        if value in s:
            s = s.replace(value, REDACTED)
    return s


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """(``uri`` without its secret, the environment variables that carry it instead).

    ``http(s)://user:password@host`` -> ``http(s)://host`` with ``MLFLOW_TRACKING_USERNAME``
    and ``MLFLOW_TRACKING_PASSWORD``; ``https://TOKEN@host`` -> ``MLFLOW_TRACKING_TOKEN``;
    ``postgresql://user:password@host/db`` keeps the user, the password goes to
    ``PGPASSWORD`` (libpq reads it). Any other URI comes back as it is, with no variables.
    """
    parts = urlsplit(str(uri))
    if "@" not in parts.netloc:
        return str(uri), {}
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, has_password, password = userinfo.partition(":")
    scheme = parts.scheme.split("+", 1)[0].lower()
    if scheme in ("http", "https"):
        if has_password:
            env = {ENV_USERNAME: unquote(user), ENV_PASSWORD: unquote(password)}
        elif len(user) >= TOKEN_LENGTH:
            env = {ENV_TOKEN: unquote(user)}
        else:
            return str(uri), {}
        return urlunsplit(parts._replace(netloc=host)), env
    if scheme in ("postgresql", "postgres") and has_password:
        return urlunsplit(parts._replace(netloc=f"{user}@{host}")), {
            ENV_PGPASSWORD: unquote(password)
        }
    return str(uri), {}


def export_credentials(uri: str, environ: MutableMapping[str, str] | None = None) -> str:
    """:func:`split_credentials`, with the variables set in ``environ`` (default: this
    process's environment, which the step processes it starts inherit); returns the URI
    without the secret."""
    clean, env = split_credentials(uri)
    target = os.environ if environ is None else environ
    target.update(env)
    return clean
