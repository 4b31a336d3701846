"""Errors that fcpts raises on purpose.

``UserError`` is a mistake the user can fix (bad option, missing file, impossible
target): the CLI prints its message on one line and exits 2. Every other exception is a
bug or an environment failure and exits 1.
"""

from __future__ import annotations


class FcptsError(Exception):
    """Base class of the errors fcpts raises on purpose."""

    exit_code = 1


class UserError(FcptsError, ValueError):
    """A mistake in the input that the user can fix; the message says how."""

    exit_code = 2


class ServiceError(FcptsError):
    """A service (MLflow, S3, a database) could not be reached or refused a request."""

    exit_code = 1
