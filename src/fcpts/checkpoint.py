"""Checkpoints of an iterative allocator, so a killed run resumes where it stopped.

One checkpoint is one safetensors file, ``<directory>/fcpts-checkpoint.safetensors``: the
tensors (thresholds, reconstructed weights, optimizer moments, RNG states) as tensors,
and everything else (iteration, lam, history, the scheduler's and optimizer's settings,
the fingerprint) as JSON in the file's header metadata. Nothing is pickled. A checkpoint
is written to a temporary file in the same folder, flushed to disk and renamed over the
previous one (``os.replace``), so the file is always a whole checkpoint: a kill during a
save leaves the previous one in place.

The header also holds a checksum of the tensors' bytes and of every other field, so a
checkpoint edited after it was written (data under a valid header, a changed iteration)
is refused, like any checkpoint that cannot be read, with a one-line ``UserError`` that
says to delete it to start afresh.

The fingerprint is a digest per input (settings, target, layers, scores, model, batches,
task, device). A resume whose inputs differ from the checkpoint's is refused with a
``UserError`` naming the inputs that differ, rather than silently mixing two runs.

This module holds the only file access of the allocation: the allocators stay pure and
talk to a :class:`Checkpointer`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .digests import sha256_text, tensors_sha256, update_tensor
from .errors import UserError

FILE_NAME = "fcpts-checkpoint.safetensors"
FORMAT = 2  # 2: with a checksum
_META_KEY = "fcpts.checkpoint"
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_DICT = "__dict__"


# ------------------------------------------------------------------------ fingerprint


def digest(value: Any) -> str:
    """A sha256 of a value made of tensors, modules, mappings, sequences and JSON scalars
    (dtype, shape and bytes of every tensor; mapping keys in sorted order)."""
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, value: Any) -> None:
    if isinstance(value, nn.Module):
        value = value.state_dict()
    if isinstance(value, torch.Tensor):
        update_tensor(h, "T", value)
    elif isinstance(value, Mapping):
        h.update(f"M{len(value)}|".encode())
        for key in sorted(value, key=str):
            h.update(f"{key!s}=".encode())
            _feed(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}|".encode())
        for item in value:
            _feed(h, item)
    else:
        h.update(f"S{json.dumps(value, sort_keys=True, default=str)}|".encode())


def fingerprint(parts: Mapping[str, Any]) -> dict[str, str]:
    """One digest per named input, e.g. ``{"settings": ..., "scores": ...}``."""
    return {name: digest(value) for name, value in parts.items()}


# ------------------------------------------------------------------ storable states


def to_storable(value: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``value`` whose tensors are moved into ``tensors`` (under
    ``prefix.<path>``) and replaced by references; tuples and non-string keys survive."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().to("cpu").clone().contiguous()
        return {_TENSOR: prefix}
    if isinstance(value, Mapping):
        return {_DICT: [[k, to_storable(v, tensors, f"{prefix}.{k}")] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [to_storable(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [to_storable(v, tensors, f"{prefix}.{i}") for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint ({prefix})")


def from_storable(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """The inverse of :func:`to_storable`."""
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(from_storable(v, tensors) for v in value[_TUPLE])
        return {k: from_storable(v, tensors) for k, v in value[_DICT]}
    if isinstance(value, list):
        return [from_storable(v, tensors) for v in value]
    return value


def rng_state(device: torch.device) -> dict[str, Any]:
    """The global torch RNG states (CPU, and the device's CUDA generator)."""
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class CheckpointConfig:
    """Where and how often to checkpoint, and whether to resume from what is there.

    With ``resume=False`` a run starts afresh and overwrites an earlier checkpoint; with
    ``resume=True`` it continues from the checkpoint in ``directory`` when there is one
    (and starts afresh when there is none, so a retried step may always pass it).
    """

    directory: Path
    every: int = 25
    resume: bool = False

    def __post_init__(self) -> None:
        if not str(self.directory).strip():
            raise UserError("checkpoint_dir is empty: give a folder for the checkpoints")
        object.__setattr__(self, "directory", Path(self.directory).expanduser())
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise UserError(
                f"checkpoint_every must be a whole number of iterations >= 1, got {self.every!r}"
            )
        if not isinstance(self.resume, bool):
            raise UserError(f"resume must be true or false, got {self.resume!r}")


@dataclass
class Snapshot:
    """A run's state at the end of ``iteration`` iterations."""

    iteration: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)


class Checkpointer:
    """Saves and loads the :class:`Snapshot` of one run (see the module docstring)."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config

    @property
    def path(self) -> Path:
        return self.config.directory / FILE_NAME

    def due(self, done: int, total: int) -> bool:
        """Whether to save after ``done`` of ``total`` iterations (every N, and the last)."""
        return done > 0 and (done % self.config.every == 0 or done == total)

    def load(self, fingerprint: Mapping[str, str], total: int | None = None) -> Snapshot | None:
        """The snapshot to resume from, or None (no resume asked, or no checkpoint yet);
        with ``total``, one saved after more than ``total`` iterations is refused."""
        for stale in self.config.directory.glob(f".{FILE_NAME}.tmp-*"):  # from killed saves
            stale.unlink(missing_ok=True)
        if not self.config.resume or not self.path.is_file():
            return None
        meta, tensors = self._read()
        try:
            state = from_storable(meta["state"], tensors)
        except (KeyError, TypeError, ValueError) as exc:
            why = f"its state refers to a tensor it lacks or is malformed: {exc!r}"
            raise self._refused(why) from None
        if not isinstance(state, dict):
            raise self._refused("its state is not a mapping")
        saved = meta["fingerprint"]
        differ = sorted(
            k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k)
        )
        if differ:
            raise UserError(
                f"the checkpoint {self.path} was written by a run with other inputs "
                f"(differing: {', '.join(differ)}): resume with the same arguments, or delete "
                "the checkpoint (or run without resume) to start afresh"
            )
        if total is not None and meta["iteration"] > total:
            raise self._refused(f"its iteration {meta['iteration']} is beyond the {total} asked")
        return Snapshot(iteration=meta["iteration"], tensors=tensors, state=state)

    def _refused(self, why: str) -> UserError:
        return UserError(
            f"the checkpoint {self.path} is not valid ({why}); delete it to start afresh"
        )

    def save(self, fingerprint: Mapping[str, str], snapshot: Snapshot) -> Path:
        """Write the snapshot atomically (temporary file, fsync, rename); return its path."""
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        stored = dict(snapshot.tensors)
        fields = {
            "format": FORMAT,
            "iteration": snapshot.iteration,
            "fingerprint": dict(fingerprint),
            "state": to_storable(snapshot.state, stored, "state"),
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in stored.items()}
        meta = dict(fields, checksum=checksum(fields, tensors))
        directory = self.config.directory
        created = not directory.exists()
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create the checkpoint folder {directory}: {exc}") from None
        tmp = directory / f".{FILE_NAME}.tmp-{uuid.uuid4().hex}"
        try:
            save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(meta)})
            _fsync(tmp)
            os.replace(tmp, self.path)
            _fsync(directory)
        except (OSError, SafetensorError) as exc:
            tmp.unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only when empty: nothing of ours left in it
            raise UserError(
                f"cannot write the checkpoint {self.path}: {exc}; free space there or give "
                "another checkpoint folder (--checkpoint-dir)"
            ) from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return self.path

    def _read(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt") as f:
                header = (f.metadata() or {}).get(_META_KEY)
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            meta = json.loads(header) if header else None
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(
                f"the checkpoint {self.path} cannot be read ({exc}); delete it to start afresh"
            ) from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(
                f"{self.path} is not an fcpts checkpoint of format {FORMAT}; delete it to start afresh"
            )
        problem = _invalid(meta, tensors)
        if problem:
            raise self._refused(problem)
        return meta, tensors


def checksum(fields: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a checkpoint's header fields (as JSON) and its tensors (names, dtypes,
    shapes, bytes)."""
    return sha256_text(
        json.dumps(fields, sort_keys=True) + "|" + tensors_sha256(sorted(tensors.items()))
    )


def _invalid(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why a checkpoint's header does not hold up, or None."""
    iteration = meta.get("iteration")
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        return f"its iteration {iteration!r} is not a whole number >= 0"
    fp = meta.get("fingerprint")
    if not isinstance(fp, dict) or not all(isinstance(v, str) for v in fp.values()):
        return "its fingerprint is not a mapping of input names to digests"
    if "state" not in meta:
        return "it has no state"
    fields = {k: v for k, v in meta.items() if k != "checksum"}
    if meta.get("checksum") != checksum(fields, tensors):
        return "its checksum does not match its data: it was changed after it was written"
    return None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
