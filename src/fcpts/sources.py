"""Where models and data come from: the source strings a user gives, resolved.

Model, weights and data sources may also be ``s3://bucket/key`` (an object) or
``s3://bucket/prefix/`` (a folder, e.g. a Hugging Face model or an ImageFolder tree):
downloaded once per version into a local cache (:mod:`fcpts.storage.cache`), then
resolved as the local path would be; the source string stays the URI.

Model sources (``--model``):

* ``demo:minilm``, ``demo:digits-cnn``: the built-in demos (offline).
* a Hugging Face or sentence-transformers folder (``config.json`` at the top, or a
  ``modules.json`` naming the Transformer module's folder): loaded with its tokenizer.
* a TorchScript file (``torch.jit.save``): loaded with ``torch.jit.load``.
* ``package.module:function`` or ``path/to/file.py:function``: a function that builds the
  ``nn.Module``, with ``--weights`` a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin``
  state_dict (read with ``torch.load(weights_only=True)``).

Data sources (``--data``):

* a text file, one sentence per line (needs a model with a tokenizer);
* a folder of images in ImageFolder layout (``root/<class>/<image>``), labels from the
  sorted class folder names;
* tensors: ``.safetensors`` or ``.npz`` with key ``x`` (optional ``y`` labels), ``.npy``
  (``x`` only), ``.pt`` holding a tensor or a dict of tensors with ``x`` (optional ``y``);
* nothing, for the demos: their built-in splits.

Every sample of a user's data set lands in exactly one of three splits, fixed by a seeded
permutation: calibration (the first third), validation (the second) and evaluation (the
last), so calibration and evaluation never share a sample. Nothing is ever unpickled:
``.pt`` files are read with ``weights_only=True`` and ``.npy``/``.npz`` without pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .core import LayerSelection
from .digests import sha256_file, tensors_sha256
from .errors import UserError
from .tasks import ClassifierTask, EncoderTask, Task

DEMO_PREFIX = "demo:"
TASKS = ("auto", "classifier", "encoder", "regression")
IMAGE_MODES = ("RGB", "L")
SPLITS = ("calibration", "validation", "evaluation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
TENSOR_SUFFIXES = (".safetensors", ".pt", ".pth", ".npy", ".npz")
_FUNCTION_SPEC = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_.]*)$")

# Batch sizes and sample counts when the user gives none. The learned method's speed
# depends on the calibration batch size: 16 sentences per batch for encoders.
GENERIC_DEFAULTS = {
    "calibration_samples": 256,
    "calibration_batch_size": 32,
    "evaluation_samples": 512,
    "evaluation_batch_size": 64,
}


@dataclass(frozen=True)
class Sources:
    """What the user pointed at: a model source, its weights, a data source and options."""

    model: str
    data: str | None = None
    weights: str | None = None
    task: str = "auto"
    image_size: int | None = None
    image_mode: str = "RGB"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("no model source given: pass --model (e.g. demo:digits-cnn)")
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose one of {', '.join(TASKS)}")
        if self.image_mode not in IMAGE_MODES:
            raise UserError(
                f"unknown image mode {self.image_mode!r}: choose RGB (3 channels) or L (grey)"
            )
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or self.image_size <= 0
        ):
            raise UserError(f"--image-size must be a positive integer, got {self.image_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sources:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------- models


@dataclass
class ResolvedModel:
    """A loaded model with what fcpts needs to know about where it came from."""

    source: str
    kind: str  # demo | huggingface | torchscript | module
    model: nn.Module
    weights: str | None = None
    tokenizer: Any = None
    demo: Any = None  # fcpts.demos.Demo for demo sources
    selection: LayerSelection = field(default_factory=LayerSelection)
    defaults: dict[str, int] = field(default_factory=lambda: dict(GENERIC_DEFAULTS))
    _digest: str | None = None

    @property
    def scripted(self) -> bool:
        return isinstance(self.model, torch.jit.ScriptModule)

    def digest(self) -> str:
        """sha256 of the dense state_dict (names, dtypes, shapes and bytes)."""
        if self._digest is None:
            self._digest = state_digest(self.model)
        return self._digest


def state_digest(model: nn.Module) -> str:
    return tensors_sha256(sorted(model.state_dict().items()))


def local_path(source: str) -> Path:
    """The local file or folder a path or an ``s3://`` URI names (S3: downloaded into
    the cache first; see :func:`fcpts.storage.cache.fetch`)."""
    from .storage.cache import fetch, is_s3_uri

    return fetch(source) if is_s3_uri(source) else Path(source).expanduser()


def resolve_model(source: str, weights: str | None = None) -> ResolvedModel:
    """Load the model a source string names; a ``UserError`` says what to fix."""
    if not isinstance(source, str) or not source.strip():
        raise UserError("no model source given: pass --model (e.g. demo:digits-cnn)")
    source = source.strip()
    if weights is not None and not str(weights).strip():
        weights = None
    if source.startswith(DEMO_PREFIX):
        if weights:
            raise UserError(f"--weights does not apply to the demo {source}: leave it out")
        return _load_demo(source)
    path = local_path(source)
    if path.is_dir():
        if weights:
            raise UserError(
                "--weights applies to a module:function source only; the folder holds its weights"
            )
        return _load_huggingface(path, source)
    if path.is_file():
        if weights:
            raise UserError(
                "--weights applies to a module:function source only; a TorchScript file holds its weights"
            )
        return _load_torchscript(path, source)
    match = _FUNCTION_SPEC.match(source)
    if match:
        return _load_function(match["module"], match["function"], weights, source)
    if os.sep in source or source.endswith((".pt", ".pth", ".ts", ".jit", ".safetensors")):
        raise UserError(f"model file or folder {source} does not exist")
    raise UserError(
        f"unknown model source {source!r}: give demo:minilm, demo:digits-cnn, a Hugging Face "
        "folder, a TorchScript file, or module:function with --weights"
    )


def _load_demo(source: str) -> ResolvedModel:
    from .demos import load_demo

    demo = load_demo(source)
    defaults = {
        "calibration_samples": demo.defaults.get("calibration_samples", 256),
        "calibration_batch_size": demo.defaults.get("batch_size", 32),
        "evaluation_samples": demo.defaults.get("evaluation_samples", 512),
        "evaluation_batch_size": 64,
    }
    tokenizer = None
    if isinstance(demo.task, EncoderTask):
        defaults["calibration_batch_size"] = 16
        # the text demo's split is functools.partial(_split, tokenizer, corpus)
        args = getattr(demo.split, "args", ())
        tokenizer = args[0] if args else None
    return ResolvedModel(
        source=f"{DEMO_PREFIX}{demo.name}",
        kind="demo",
        model=demo.model.eval(),
        tokenizer=tokenizer,
        demo=demo,
        selection=demo.selection,
        defaults=defaults,
    )


def _huggingface_dir(path: Path) -> Path:
    if (path / "config.json").is_file():
        return path
    modules = path / "modules.json"
    if modules.is_file():  # sentence-transformers layout with the transformer in a subfolder
        try:
            entries = json.loads(modules.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise UserError(f"{modules} is not valid JSON ({exc})") from None
        for entry in entries if isinstance(entries, list) else []:
            if str(entry.get("type", "")).endswith("Transformer"):
                sub = path / str(entry.get("path", ""))
                if (sub / "config.json").is_file():
                    return sub
    raise UserError(
        f"folder {path} is not a Hugging Face model: it has no config.json "
        "(nor a sentence-transformers modules.json pointing to one)"
    )


def _load_huggingface(path: Path, source: str) -> ResolvedModel:
    from .demos.minilm import load_encoder

    folder = _huggingface_dir(path)
    try:
        model, tokenizer = load_encoder(folder)
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError on bad folders
        raise UserError(
            f"cannot load the Hugging Face model in {folder}: {_first_line(exc)}"
        ) from None
    names = {name for name, _ in model.named_modules()}
    selection = (
        LayerSelection(exclude=("pooler.*",)) if "pooler.dense" in names else LayerSelection()
    )
    defaults = dict(GENERIC_DEFAULTS, calibration_batch_size=16)
    return ResolvedModel(
        source=source,
        kind="huggingface",
        model=model.eval(),
        tokenizer=tokenizer,
        selection=selection,
        defaults=defaults,
    )


def _load_torchscript(path: Path, source: str) -> ResolvedModel:
    if path.suffix in (".safetensors", ".npy", ".npz", ".txt", ".json", ".yaml", ".yml"):
        raise UserError(
            f"{path} is not a model: give a TorchScript file, or module:function with --weights {path}"
        )
    try:
        model = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise UserError(
            f"{path} is not a TorchScript file ({_first_line(exc)}); for a state_dict give "
            "module:function with --weights"
        ) from None
    return ResolvedModel(source=source, kind="torchscript", model=model.eval())


def _import_function(module: str, function: str):
    if module.endswith(".py"):
        path = Path(module).expanduser()
        if not path.is_file():
            raise UserError(f"model builder file {module} does not exist")
        name = f"_fcpts_user_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise UserError(f"cannot import {module}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except Exception as exc:
            sys.modules.pop(name, None)
            raise UserError(f"importing {module} failed: {_first_line(exc)}") from None
    else:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise UserError(
                f"unknown model source: module {module!r} cannot be imported ({exc.msg}); "
                "is it installed or on PYTHONPATH?"
            ) from None
        except Exception as exc:
            raise UserError(f"importing {module} failed: {_first_line(exc)}") from None
    target: Any = mod
    for part in function.split("."):
        if not hasattr(target, part):
            raise UserError(f"module {module} has no {function!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"{module}:{function} is not callable")
    return target


def _load_function(module: str, function: str, weights: str | None, source: str) -> ResolvedModel:
    build = _import_function(module, function)
    try:
        model = build()
    except Exception as exc:
        raise UserError(f"{source}() failed: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = load_weights(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(
                f"--weights {weights} do not fit {source}: {_first_line(exc)}"
            ) from None
    return ResolvedModel(source=source, kind="module", model=model.eval(), weights=weights)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file (never unpickled)."""
    p = local_path(str(path))
    if not p.is_file():
        raise UserError(f"weights file {path} does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(
                f"{p} is not a readable safetensors file ({_first_line(exc)})"
            ) from None
    if p.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"weights file {p} must end in {', '.join(WEIGHT_SUFFIXES)}")
    state = _torch_load(p)
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise UserError(f"{p} does not hold a state_dict (a mapping of names to tensors)")
    return dict(state)


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # UnpicklingError for non-tensor content, RuntimeError for corrupt zips
        raise UserError(
            f"{path} cannot be read as weights-only torch data ({_first_line(exc)}); "
            "fcpts never unpickles arbitrary objects: save tensors only, or use safetensors"
        ) from None


# --------------------------------------------------------------------------- layers


class _ScriptedLayers(nn.Module):
    """An eager stand-in for a TorchScript model's prunable layers, for layer discovery.

    TorchScript modules are not instances of ``nn.Linear``/``nn.ConvNd``; this mirror holds
    real modules of those types at the same names whose weights *are* the scripted
    model's parameters, so allocations computed on it apply to the scripted model.
    """

    _TYPES = {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        for name, module in scripted.named_modules():
            kind = getattr(module, "original_name", "")
            weight = getattr(module, "weight", None) if kind in self._TYPES else None
            if not isinstance(weight, torch.Tensor):
                continue
            if kind == "Linear":
                mirror: nn.Module = nn.Linear(
                    weight.shape[1], weight.shape[0], bias=False, device="meta"
                )
            else:
                groups = int(getattr(module, "groups", 1))
                mirror = self._TYPES[kind](
                    weight.shape[1] * groups,
                    weight.shape[0],
                    tuple(weight.shape[2:]),
                    groups=groups,
                    bias=False,
                    device="meta",
                )
            mirror.weight = (
                weight
                if isinstance(weight, nn.Parameter)
                else nn.Parameter(weight, requires_grad=False)
            )
            self._attach(name, mirror)

    def _attach(self, name: str, module: nn.Module) -> None:
        parent: nn.Module = self
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)


def layer_view(resolved: ResolvedModel) -> nn.Module:
    """The module whose prunable layers fcpts discovers (the model, or a TorchScript mirror)."""
    return _ScriptedLayers(resolved.model) if resolved.scripted else resolved.model


# ----------------------------------------------------------------------------- data


@dataclass
class DataSource:
    """A data set split three ways; ``split`` returns batches ready for the task."""

    source: str
    kind: str  # demo | text | images | tensors
    samples: int | None  # total size (None for the demos: their splits are fixed)
    has_labels: bool
    digest: str | None = None
    classes: list[str] | None = None
    _loader: Any = None

    def split(self, name: str, n: int, batch_size: int, seed: int = 0) -> list[Any]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if n <= 0 or batch_size <= 0:
            raise UserError(
                f"sample counts and batch sizes must be positive, got {n} and {batch_size}"
            )
        return self._loader(name, n, batch_size, seed)

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "samples": self.samples,
            "has_labels": self.has_labels,
            "sha256": self.digest,
            "classes": self.classes,
        }


def split_indices(total: int, name: str, seed: int) -> list[int]:
    """The indices of split ``name`` of a data set of ``total`` samples (thirds of a
    seeded permutation: disjoint whatever the sample counts asked for)."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed))).tolist()
    third = total // 3
    bounds = {
        "calibration": (0, third),
        "validation": (third, 2 * third),
        "evaluation": (2 * third, total),
    }
    lo, hi = bounds[name]
    return perm[lo:hi]


def _take(total: int, name: str, n: int, seed: int, source: str) -> list[int]:
    pool = split_indices(total, name, seed)
    if not pool:
        raise UserError(
            f"data {source} has {total} sample{'s' if total != 1 else ''}: too few for a {name} split (each split gets a third)"
        )
    return pool[: min(n, len(pool))]


def resolve_data(sources: Sources, model: ResolvedModel) -> DataSource:
    spec = sources.data.strip() if sources.data else None
    if not spec or spec.startswith(DEMO_PREFIX):
        if model.demo is None:
            raise UserError(f"no data given for {model.source}: pass --data (a file or folder)")
        if spec and spec.removeprefix(DEMO_PREFIX) != model.demo.name:
            raise UserError(f"data {spec} does not belong to {model.source}; leave --data out")
        return _demo_data(model)
    path = local_path(spec)
    if not path.exists():
        raise UserError(f"data file or folder {spec} does not exist")
    if path.is_dir():
        return _image_folder(path, spec, sources)
    if path.suffix in TENSOR_SUFFIXES:
        return _tensor_file(path, spec)
    return _text_file(path, spec, model)


def _demo_data(model: ResolvedModel) -> DataSource:
    demo = model.demo
    labels = isinstance(demo.task, ClassifierTask)

    def load(name: str, n: int, batch_size: int, seed: int) -> list[Any]:
        return demo.split(name, n, batch_size)

    return DataSource(
        source=f"demo:{demo.name}", kind="demo", samples=None, has_labels=labels, _loader=load
    )


def _text_file(path: Path, spec: str, model: ResolvedModel) -> DataSource:
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
    from .demos.minilm import tokenize

    def load(name: str, n: int, batch_size: int, seed: int) -> list[Any]:
        chosen = [sentences[i] for i in _take(len(sentences), name, n, seed, spec)]
        return tokenize(model.tokenizer, chosen, batch_size)

    return DataSource(
        source=spec,
        kind="text",
        samples=len(sentences),
        has_labels=False,
        digest=hashlib.sha256(raw).hexdigest(),
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


def _tensor_file(path: Path, spec: str) -> DataSource:
    suffix = path.suffix
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            data: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(
                f"{spec} is not a readable safetensors file ({_first_line(exc)})"
            ) from None
    elif suffix in (".npy", ".npz"):
        import numpy as np

        try:
            loaded = np.load(str(path), allow_pickle=False)
            arrays = (
                {k: np.array(loaded[k]) for k in loaded.files}
                if suffix == ".npz"
                else {"x": np.array(loaded)}
            )
        except (ValueError, OSError, EOFError) as exc:
            raise UserError(
                f"{spec} is not a readable {suffix} file without pickled objects ({_first_line(exc)})"
            ) from None
        for key, arr in arrays.items():
            if arr.dtype.kind not in "biuf":
                raise UserError(
                    f"{spec}: array {key!r} holds {arr.dtype} values, not numbers: save the "
                    "inputs as a float array (and labels as integers)"
                )
        tensors = {k: torch.from_numpy(arr) for k, arr in arrays.items()}
        data = tensors if suffix == ".npz" else tensors["x"]
    else:
        data = _torch_load(path)
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

    def load(name: str, n: int, batch_size: int, seed: int) -> list[Any]:
        idx = torch.tensor(_take(total, name, n, seed, spec))
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
        _loader=load,
    )


def _image_folder(path: Path, spec: str, sources: Sources) -> DataSource:
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
    for f, label in files:
        digest.update(f"{f.relative_to(path)}|{label}|{f.stat().st_size}\n".encode())

    def read(f: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(f) as img:
                img = img.convert(sources.image_mode)
                if sources.image_size:
                    img = img.resize((sources.image_size, sources.image_size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as exc:
            raise UserError(f"image {f} cannot be read ({_first_line(exc)})") from None
        t = torch.from_numpy(arr.copy())
        return t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1)

    def load(name: str, n: int, batch_size: int, seed: int) -> list[Any]:
        chosen = [files[i] for i in _take(len(files), name, n, seed, spec)]
        images = [read(f) for f, _ in chosen]
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise UserError(
                f"images in {spec} have different sizes {sorted(shapes)[:3]}: pass --image-size N to resize them"
            )
        xs = torch.stack(images)
        ys = torch.tensor([label for _, label in chosen], dtype=torch.long)
        return [
            {"x": xs[i : i + batch_size].contiguous(), "y": ys[i : i + batch_size].contiguous()}
            for i in range(0, len(chosen), batch_size)
        ]

    return DataSource(
        source=spec,
        kind="images",
        samples=len(files),
        has_labels=True,
        digest=digest.hexdigest(),
        classes=classes,
        _loader=load,
    )


# ----------------------------------------------------------------------------- tasks


def make_task(kind: str) -> Task:
    if kind == "classifier":
        return ClassifierTask()
    if kind == "encoder":
        return EncoderTask()
    if kind == "regression":
        return Task()
    raise UserError(f"unknown task {kind!r}: choose one of {', '.join(TASKS)}")


def task_kind(task: Task) -> str:
    if isinstance(task, EncoderTask):
        return "encoder"
    if isinstance(task, ClassifierTask):
        return "classifier"
    return "regression"


def resolve_task(kind: str, model: ResolvedModel, data: DataSource) -> Task:
    """The task for ``kind`` (auto: the demo's task, encoder for Hugging Face models,
    classifier when the data has labels, otherwise output MSE)."""
    if kind == "auto":
        if model.demo is not None:
            return model.demo.task
        if model.kind == "huggingface":
            return EncoderTask()
        return ClassifierTask() if data.has_labels else Task()
    task = make_task(kind)
    if isinstance(task, EncoderTask) and data.kind not in ("text", "demo"):
        raise UserError(
            "--task encoder needs tokenized text data: give a text file and a Hugging Face model"
        )
    return task


@torch.no_grad()
def check_fit(model: nn.Module, task: Task, batch: Any, data: DataSource) -> None:
    """One forward pass on one batch: a clear UserError when data and model don't fit."""
    try:
        raw = task.run(model, batch)
        out = task.output(raw, batch)
    except Exception as exc:
        shapes = _batch_shapes(batch)
        raise UserError(
            f"the data {data.source} does not fit the model (batch {shapes}): {_first_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"the model returned {type(out).__name__}, not a tensor, on data {data.source}"
        )
    if isinstance(task, ClassifierTask):
        if out.dim() != 2:
            raise UserError(
                f"a classifier must return (batch, classes) logits; the model returned shape {tuple(out.shape)}: "
                "use --task regression"
            )
        if isinstance(batch, Mapping) and "y" in batch:
            top = int(batch["y"].max())
            if top >= out.shape[1]:
                raise UserError(
                    f"label {top} in {data.source} is out of range for a model with {out.shape[1]} outputs"
                )


def _batch_shapes(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return ", ".join(
            f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor)
        )
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    return type(batch).__name__


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def finite_positive(value: float, what: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(f"{what} must be a finite number >= 0, got {value}")
    return value
