"""Data sources resolved: text files, image folders, tensor files and the demos' splits.

Each split (calibration, validation, evaluation) reads its own source when one is given
(``--calibration-data``, ...: the whole source, in a seeded order), else ``--data``, whose
samples land in exactly one of three splits (thirds of a seeded permutation), so
calibration and evaluation never share a sample (see :mod:`fcpts.sources`).
:func:`resolve_data` returns one :class:`DataSource` serving every split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..demos.minilm import tokenize
from ..digests import sha256_file
from ..errors import UserError
from ..tasks import ClassifierTask
from .files import first_line, local_path, read_safetensors, torch_load
from .images import IMAGE_SUFFIXES, ImagePrep
from .models import ResolvedModel
from .spec import DEMO_PREFIX, SPLITS, Sources
from .splits import DataSource, Picker, check_agree

TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".npz")


def resolve_data(
    sources: Sources, model: ResolvedModel, primary: str = "calibration"
) -> DataSource:
    """The data of every split: each split's own source, else ``--data`` in thirds, else
    the demo's splits. The result describes the ``primary`` split's source (the one the
    step reads: a UserError when it has none) and checks that the splits' sources agree
    (one kind and sample shape, no two the same data)."""
    fallback: list[DataSource | None] = []  # --data, resolved once for the splits it serves
    parts: dict[str, DataSource | None] = {}
    for name in SPLITS:
        flag, spec = sources.split_source(name)
        if flag != "--data":
            parts[name] = _resolve_one(spec, flag, True, sources, model, True)
            continue
        if not fallback:
            fallback.append(_resolve_one(spec, flag, False, sources, model, name == primary))
        parts[name] = fallback[0]
    main = parts[primary]
    if main is None:
        raise UserError(
            f"no data given for {model.source}: pass --data (a file or folder, split in "
            f"thirds) or --{primary}-data"
        )
    check_agree(parts)
    ranges = [p.label_range for p in parts.values() if p is not None and p.label_range]
    return DataSource(
        source=main.source,
        kind=main.kind,
        samples=main.samples,
        has_labels=main.has_labels,
        digest=main.digest,
        classes=main.classes,
        label_range=(min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None,
        flag=main.flag,
        whole=main.whole,
        sample_shape=main.sample_shape,
        parts=parts,
    )


def _resolve_one(
    spec: str | None,
    flag: str,
    whole: bool,
    sources: Sources,
    model: ResolvedModel,
    needed: bool,
) -> DataSource | None:
    """The source ``spec`` of ``flag``; None when there is none and it is not ``needed``."""
    if not spec or spec.startswith(DEMO_PREFIX):
        if model.demo is None:
            if not needed:
                return None
            raise UserError(f"no data given for {model.source}: pass --data (a file or folder)")
        if spec and spec.removeprefix(DEMO_PREFIX) != model.demo.name:
            raise UserError(f"{flag} {spec} does not belong to {model.source}; leave {flag} out")
        return _demo_data(model)
    try:
        path = local_path(spec)
        if not path.exists():
            raise UserError(f"data file or folder {spec} does not exist")
        if path.is_dir():
            return _image_folder(path, spec, sources, flag, whole)
        if path.suffix in TENSOR_SUFFIXES:
            return _tensor_file(path, spec, flag, whole)
        return _text_file(path, spec, model, flag, whole)
    except UserError as exc:
        if str(exc).startswith(flag):
            raise
        raise UserError(f"{flag}: {exc}") from None


def _demo_data(model: ResolvedModel) -> DataSource:
    demo = model.demo
    labels = isinstance(demo.task, ClassifierTask)

    def load(name: str, n: int, batch_size: int, seed: int, exact: bool) -> list[Any]:
        return demo.split(name, n, batch_size)

    return DataSource(
        source=f"demo:{demo.name}", kind="demo", samples=None, has_labels=labels, _loader=load
    )


def _text_file(path: Path, spec: str, model: ResolvedModel, flag: str, whole: bool) -> DataSource:
    if model.tokenizer is None:
        raise UserError(
            f"text data {spec} needs a model with a tokenizer (a Hugging Face folder); "
            f"{model.source} has none: give tensors or images instead"
        )
    try:
        raw = path.read_bytes()
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except UnicodeDecodeError:
        raise UserError(f"{spec} is not a UTF-8 text file (one sentence per line)") from None
    sentences = [line for line in lines if line]
    if not sentences:
        raise UserError(f"text file {spec} has no non-empty line")

    pick = Picker(len(sentences), spec, flag, whole)

    def load(name: str, n: int, batch_size: int, seed: int, exact: bool) -> list[Any]:
        chosen = [sentences[i] for i in pick(name, n, seed, exact)]
        return tokenize(model.tokenizer, chosen, batch_size)

    return DataSource(
        source=spec,
        kind="text",
        samples=len(sentences),
        has_labels=False,
        digest=hashlib.sha256(raw).hexdigest(),
        flag=flag,
        whole=whole,
        _loader=load,
    )


def _check_xy(x: Any, y: Any, spec: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[0] == 0:
        raise UserError(f"{spec}: 'x' must be a non-empty tensor with samples on the first axis")
    if x.dtype == torch.float64:
        x = x.float()
    if x.dtype.is_floating_point and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise UserError(
            f"{spec}: 'x' holds {bad} NaN or infinite values of {x.numel()}: clean or drop "
            "those samples first"
        )
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
            raise UserError(
                f"{spec}: 'y' must be a 1-D tensor of {x.shape[0]} labels, one per sample of 'x'"
            )
        if y.dtype.is_floating_point or y.dtype == torch.bool:
            raise UserError(f"{spec}: 'y' must hold integer class labels, got {y.dtype}")
        y = y.long()
    return x, y


def _read_tensors(path: Path, spec: str) -> Any:
    """The content of a tensor file: a tensor, or a mapping of names to tensors."""
    suffix = path.suffix
    if suffix == ".safetensors":
        return read_safetensors(path, spec)
    if suffix not in (".npy", ".npz"):
        return torch_load(path)
    try:
        loaded = np.load(str(path), allow_pickle=False)
        arrays = (
            {k: np.array(loaded[k]) for k in loaded.files}
            if suffix == ".npz"
            else {"x": np.array(loaded)}
        )
    except (ValueError, OSError, EOFError) as exc:
        raise UserError(
            f"{spec} is not a readable {suffix} file without pickled objects ({first_line(exc)})"
        ) from None
    for key, arr in arrays.items():
        if arr.dtype.kind not in "biuf":
            raise UserError(
                f"{spec}: array {key!r} holds {arr.dtype} values, not numbers: save the "
                "inputs as a float array (and labels as integers)"
            )
    tensors = {k: torch.from_numpy(arr) for k, arr in arrays.items()}
    return tensors if suffix == ".npz" else tensors["x"]


def _tensor_file(path: Path, spec: str, flag: str, whole: bool) -> DataSource:
    data = _read_tensors(path, spec)
    if isinstance(data, torch.Tensor):
        x, y = data, None
    elif isinstance(data, Mapping):
        if "x" not in data:
            raise UserError(
                f"{spec} has no tensor 'x' (keys: {', '.join(map(str, data)) or 'none'})"
            )
        x, y = data["x"], data.get("y")
    else:
        raise UserError(f"{spec} must hold a tensor or a mapping with 'x' (and optionally 'y')")
    x, y = _check_xy(x, y, spec)
    total = int(x.shape[0])
    pick = Picker(total, spec, flag, whole)

    def load(name: str, n: int, batch_size: int, seed: int, exact: bool) -> list[Any]:
        idx = torch.tensor(pick(name, n, seed, exact))
        xs = x[idx]
        ys = y[idx] if y is not None else None
        out = []
        for i in range(0, len(idx), batch_size):
            batch = {"x": xs[i : i + batch_size].contiguous()}
            if ys is not None:
                batch["y"] = ys[i : i + batch_size].contiguous()
            out.append(batch)
        return out

    return DataSource(
        source=spec,
        kind="tensors",
        samples=total,
        has_labels=y is not None,
        digest=sha256_file(path),
        label_range=(int(y.min()), int(y.max())) if y is not None else None,
        flag=flag,
        whole=whole,
        sample_shape=tuple(x.shape[1:]),
        _loader=load,
    )


def _image_folder(path: Path, spec: str, sources: Sources, flag: str, whole: bool) -> DataSource:
    classes = sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        for f in sorted((path / cls).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                files.append((f, label))
    if not files:
        raise UserError(
            f"folder {spec} holds no images in ImageFolder layout ({spec}/<class>/<image>"
            f"{'/'.join(IMAGE_SUFFIXES[:3])})"
        )
    digest = hashlib.sha256()
    prep = ImagePrep.of(sources)
    if prep != ImagePrep(mode=prep.mode):  # the preprocessing is part of the data
        digest.update(
            f"{prep.size}|{prep.crop}|{prep.mean}|{prep.std}|{prep.transform_name}\n".encode()
        )
    for f, label in files:
        digest.update(f"{f.relative_to(path)}|{label}|{f.stat().st_size}\n".encode())
    pick = Picker(len(files), spec, flag, whole)

    def load(name: str, n: int, batch_size: int, seed: int, exact: bool) -> list[Any]:
        chosen = [files[i] for i in pick(name, n, seed, exact)]
        images = [prep.read(f) for f, _ in chosen]
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise UserError(
                f"{flag}: images in {spec} have different sizes {sorted(shapes)[:3]}: pass "
                "--center-crop N (with --image-size) to give them one size"
            )
        xs = torch.stack(images)
        ys = torch.tensor([label for _, label in chosen], dtype=torch.long)
        return [
            {"x": xs[i : i + batch_size].contiguous(), "y": ys[i : i + batch_size].contiguous()}
            for i in range(0, len(chosen), batch_size)
        ]

    labels = [label for _, label in files]
    return DataSource(
        source=spec,
        kind="images",
        samples=len(files),
        has_labels=True,
        digest=digest.hexdigest(),
        classes=classes,
        label_range=(min(labels), max(labels)),
        flag=flag,
        whole=whole,
        sample_shape=tuple(prep.read(files[0][0]).shape) if prep.crop or prep.transform else None,
        _loader=load,
    )


def sample_digests(batches: Sequence[Any]) -> list[str]:
    """A short digest of every sample (labels and padding excluded), to prove that two
    sets of batches share no sample."""
    out = []
    for batch in batches:
        if isinstance(batch, torch.Tensor):
            batch = {"x": batch}
        mask = batch.get("attention_mask")
        keys = sorted(k for k in batch if k not in ("y", "attention_mask", "token_type_ids"))
        n = int(batch[keys[0]].shape[0])
        for i in range(n):
            h = hashlib.sha256()
            for key in keys:
                row = batch[key][i]
                if mask is not None and row.dim() >= 1 and row.shape[0] == mask.shape[1]:
                    row = row[mask[i].bool()]
                h.update(key.encode())
                h.update(row.detach().cpu().contiguous().numpy().tobytes())
            out.append(h.hexdigest()[:20])
    return out
