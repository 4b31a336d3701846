"""Model sources resolved: the built-in demos, Hugging Face folders, TorchScript files and
``module:function`` builders with ``--weights`` (see :mod:`fcpts.sources`)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from ..core import LayerSelection
from ..demos import load_demo
from ..demos.gpt2 import load_causal_lm
from ..demos.minilm import load_encoder
from ..digests import tensors_sha256
from ..errors import UserError
from ..tasks import EncoderTask
from .causal_lm import CAUSAL_SELECTION, causal_architecture
from .files import first_line, import_callable, local_path, read_safetensors, torch_load
from .spec import DEMO_PREFIX

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
FUNCTION_SOURCE = re.compile(r"^(?P<module>[^:]+):(?P<function>[A-Za-z_][A-Za-z0-9_.]*)$")

# Batch sizes and sample counts when the user gives none. The learned method's speed
# depends on the calibration batch size: 16 sentences per batch for encoders.
GENERIC_DEFAULTS = MappingProxyType(
    {
        "calibration_samples": 256,
        "calibration_batch_size": 32,
        "evaluation_samples": 512,
        "evaluation_batch_size": 64,
    }
)


@dataclass
class ResolvedModel:
    """A loaded model with what fcpts needs to know about where it came from."""

    source: str
    kind: str  # demo | huggingface | torchscript | module
    model: nn.Module
    weights: str | None = None
    tokenizer: Any = None
    folder: Path | None = None  # a Hugging Face source's folder (configs, modules to copy)
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
    """sha256 of a state_dict (names, dtypes, shapes and bytes)."""
    return tensors_sha256(sorted(model.state_dict().items()))


def parse_function_source(source: str) -> tuple[str, str] | None:
    """``(module, function)`` of a ``package.module:function`` or ``file.py:function``
    source, or None when ``source`` has not that form."""
    match = FUNCTION_SOURCE.match(source)
    return (match["module"], match["function"]) if match else None


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
    function = parse_function_source(source)
    if function:
        return _load_function(*function, weights, source)
    if os.sep in source or source.endswith((".pt", ".pth", ".ts", ".jit", ".safetensors")):
        raise UserError(f"model file or folder {source} does not exist")
    raise UserError(
        f"unknown model source {source!r}: give demo:minilm, demo:digits-cnn, a Hugging Face "
        "folder, a TorchScript file, or module:function with --weights"
    )


def _load_demo(source: str) -> ResolvedModel:
    demo = load_demo(source)
    defaults = {
        "calibration_samples": demo.defaults.get("calibration_samples", 256),
        "calibration_batch_size": demo.defaults.get("batch_size", 32),
        "evaluation_samples": demo.defaults.get("evaluation_samples", 512),
        "evaluation_batch_size": 64,
    }
    if isinstance(demo.task, EncoderTask):
        defaults["calibration_batch_size"] = 16
    return ResolvedModel(
        source=f"{DEMO_PREFIX}{demo.name}",
        kind="demo",
        model=demo.model.eval(),
        tokenizer=demo.tokenizer,
        folder=demo.folder,
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
    folder = _huggingface_dir(path)
    causal = causal_architecture(folder) is not None
    try:
        model, tokenizer = load_causal_lm(folder) if causal else load_encoder(folder)
    except UserError:
        raise
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError on bad folders
        raise UserError(
            f"cannot load the Hugging Face model in {folder}: {first_line(exc)}"
        ) from None
    names = {name for name, _ in model.named_modules()}
    selection = (
        LayerSelection(exclude=("pooler.*",)) if "pooler.dense" in names else LayerSelection()
    )
    defaults = dict(GENERIC_DEFAULTS, calibration_batch_size=16)
    if causal:  # token blocks of a decoder: fewer, larger samples
        selection = CAUSAL_SELECTION
        defaults = dict(defaults, calibration_samples=64, calibration_batch_size=8)
        defaults.update(evaluation_samples=64, evaluation_batch_size=8)
    return ResolvedModel(
        source=source,
        kind="huggingface",
        model=model.eval(),
        tokenizer=tokenizer,
        folder=path,
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
            f"{path} is not a TorchScript file ({first_line(exc)}); for a state_dict give "
            "module:function with --weights"
        ) from None
    return ResolvedModel(source=source, kind="torchscript", model=model.eval())


def _import_function(module: str, function: str):
    return import_callable(module, function, "model builder", "unknown model source")


def _load_function(module: str, function: str, weights: str | None, source: str) -> ResolvedModel:
    build = _import_function(module, function)
    try:
        model = build()
    except Exception as exc:
        raise UserError(f"{source}() failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"{source}() returned {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = load_weights(weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"--weights {weights} do not fit {source}: {first_line(exc)}") from None
    return ResolvedModel(source=source, kind="module", model=model.eval(), weights=weights)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state_dict from safetensors or a weights-only torch file (never unpickled)."""
    p = local_path(str(path))
    if not p.is_file():
        raise UserError(f"weights file {path} does not exist")
    if p.suffix == ".safetensors":
        return read_safetensors(p, p)
    if p.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"weights file {p} must end in {', '.join(WEIGHT_SUFFIXES)}")
    state = torch_load(p)
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
