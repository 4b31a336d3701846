"""A lock on decisions about one registered model, held in the registry itself (see
:mod:`fcpts.tracking.registry`)."""

from __future__ import annotations

import os
import random
import socket
import time
import uuid
from typing import Any

from mlflow.exceptions import MlflowException

from ..errors import ServiceError
from .connection import Store
from .names import ERR_EXISTS, ERR_MISSING, LOCK_SUFFIX


class RegistryLock:
    """A lock for one registered model, held as the registered model ``<name>.fcpts-lock``
    on the same tracking server (see the module docstring)."""

    def __init__(self, store: Store, name: str, *, timeout: float = 60.0, ttl: float = 120.0):
        self.store = store
        self.name = name
        self.lock_name = name + LOCK_SUFFIX
        self.timeout = timeout
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.held = False

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _read(self):
        try:
            return self.store.call(
                "read the registry lock",
                self.store.client.get_registered_model,
                self.lock_name,
                passthrough=(ERR_MISSING,),
            )
        except MlflowException:
            return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                self.store.call(
                    f"take the registry lock of {self.name}",
                    self.store.client.create_registered_model,
                    self.lock_name,
                    tags={"fcpts.lock": "true", "holder": self.holder, "token": self.token},
                    description=(
                        f"Lock of fcpts decisions on model {self.name}; held by {self.holder}. "
                        f"Safe to delete when older than {self.ttl:.0f} s."
                    ),
                    # a creation racing another's release can report the model missing
                    passthrough=(ERR_EXISTS, ERR_MISSING),
                )
                self.held = True
                return
            except MlflowException:
                pass  # somebody holds it, or took or released it meanwhile: look again
            held = self._read()
            if held is not None and held.tags.get("token") == self.token:
                self.held = True  # our creation went through although its reply was an error
                return
            if held is not None:
                age = time.time() - held.creation_timestamp / 1000.0
                if age > self.ttl:
                    self._break(held.tags.get("token"))
                    continue
            if time.monotonic() > deadline:
                holder = held.tags.get("holder", "?") if held is not None else "?"
                raise ServiceError(
                    f"could not take the registry lock of model {self.name} within "
                    f"{self.timeout:.0f} s: another fcpts process ({holder}) holds it on "
                    f"{self.store.safe_uri}; retry later, or if no fcpts process is running, "
                    f"delete the registered model {self.lock_name!r} (MLflow UI, or "
                    f"MlflowClient().delete_registered_model({self.lock_name!r}))"
                )
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.5)

    def _break(self, token: str | None) -> None:
        again = self._read()
        if again is None or again.tags.get("token") != token:
            return  # released or re-taken meanwhile
        try:
            self.store.call(
                "break a stale registry lock",
                self.store.client.delete_registered_model,
                self.lock_name,
                passthrough=(ERR_MISSING,),
            )
        except MlflowException:
            pass

    def verify(self) -> None:
        """Raise ServiceError unless this process still holds the lock."""
        held = self._read()
        if held is None or held.tags.get("token") != self.token:
            self.held = False
            raise ServiceError(
                f"lost the registry lock of model {self.name} (held longer than {self.ttl:.0f} s "
                "and broken by another process); nothing more was changed: rerun the command"
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        held = self._read()
        if held is None or held.tags.get("token") != self.token:
            return
        try:
            self.store.call(
                f"release the registry lock of {self.name}",
                self.store.client.delete_registered_model,
                self.lock_name,
                passthrough=(ERR_MISSING,),
            )
        except MlflowException:
            pass
