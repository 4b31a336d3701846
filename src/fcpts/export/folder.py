"""The allocate output folder in the source model's own format, loadable without fcpts.

* A Hugging Face model (a transformers ``PreTrainedModel``) is written with its own
  ``save_pretrained`` (``config.json`` naming its class, ``model.safetensors``) and its
  tokenizer's ``save_pretrained``, so ``AutoModel``/``AutoModelForCausalLM`` and
  ``AutoTokenizer.from_pretrained(folder)`` load it. When the source folder is a
  sentence-transformers model (``modules.json``), its modules.json, configs and the
  other modules (pooling, normalize, dense) are copied around it, so
  ``SentenceTransformer(folder)`` loads it too.
* A TorchScript model is written as a TorchScript file, ``model.pt``.
* Any other module (``module:function`` sources, the digits demo) as its state_dict,
  ``model.safetensors``.
* ``compressed`` (a list of parameter names) writes the weights instead as
  ``model.compressed.safetensors`` in the bitmask+values format of
  :mod:`fcpts.export.sparse_format`; fcpts loads it back bit-exactly, other tools do not.

Every file written is readable by group and others (``0644``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from . import sparse_format

MODEL_FILE = "model.safetensors"
TORCHSCRIPT_FILE = "model.pt"
COMPRESSED_FILE = "model.compressed.safetensors"
FILE_MODE = 0o644
DIR_MODE = 0o755
ST_FILES = ("modules.json", "config_sentence_transformers.json")
ST_TRANSFORMER_FILES = ("sentence_bert_config.json",)
MAX_SHARD = "10000GB"  # one weights file, which the manifest's sha256 names


@dataclass(frozen=True)
class SourceFormat:
    """What the folder writer needs to know of the source model beyond its weights."""

    folder: Path | None = None  # the source's folder (a Hugging Face or sentence-transformers one)
    tokenizer: Any = None
    # units removed: the shapes no longer match the source's config (per-layer widths), so
    # the weights are written as a state_dict (fcpts rebuilds the shapes from the manifest;
    # model.onnx runs it without fcpts) and the tokenizer beside them
    reshaped: bool = False


def kind(model: nn.Module) -> str:
    """``torchscript``, ``huggingface`` (a transformers PreTrainedModel) or ``module``."""
    if isinstance(model, torch.jit.ScriptModule):
        return "torchscript"
    if hasattr(model, "save_pretrained") and hasattr(model, "config"):
        return "huggingface"
    return "module"


def st_transformer_path(folder: Path | None) -> str | None:
    """The Transformer module's sub-path of a sentence-transformers folder ("" at its
    root), or None when ``folder`` is not one."""
    if folder is None or not (Path(folder) / "modules.json").is_file():
        return None
    try:
        entries = json.loads((Path(folder) / "modules.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and str(entry.get("type", "")).endswith("Transformer"):
            return str(entry.get("path", ""))
    return None


def _copy_st_modules(source: Path, out: Path, transformer: str) -> None:
    for name in ST_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    for name in ST_TRANSFORMER_FILES:
        if (source / transformer / name).is_file():
            (out / transformer).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / transformer / name, out / transformer / name)
    for entry in json.loads((source / "modules.json").read_text()):
        path = str(entry.get("path", ""))
        if path and path != transformer and (source / path).is_dir():
            shutil.copytree(source / path, out / path, dirs_exist_ok=True)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def write_folder(
    model: nn.Module,
    out: str | os.PathLike,
    source: SourceFormat | None = None,
    compressed: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Write ``model`` into ``out`` in its source's format; returns the manifest entries
    ``model_file`` (relative to ``out``), ``model_format`` and ``files`` (every file)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source = source or SourceFormat()
    found = kind(model)
    base = out
    if found == "huggingface" and source.reshaped:
        found = "module"
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(base))
    if found == "huggingface":
        transformer = st_transformer_path(source.folder)
        if transformer is not None:
            _copy_st_modules(Path(source.folder), out, transformer)
            base = out / transformer
        base.mkdir(parents=True, exist_ok=True)
        if compressed is None:
            model.save_pretrained(str(base), max_shard_size=MAX_SHARD)
        else:
            model.config.save_pretrained(str(base))
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(str(base))
    if compressed is not None:
        sparse_format.save_packed(_state(model), compressed, base / COMPRESSED_FILE)
        model_file, model_format = base / COMPRESSED_FILE, sparse_format.FORMAT_NAME
    elif found == "torchscript":
        torch.jit.save(model, str(base / TORCHSCRIPT_FILE))
        model_file, model_format = base / TORCHSCRIPT_FILE, "torchscript"
    elif found == "huggingface":
        model_file, model_format = base / MODEL_FILE, "safetensors (transformers save_pretrained)"
    else:
        save_file(_state(model), str(base / MODEL_FILE), metadata={"format": "pt"})
        model_file, model_format = base / MODEL_FILE, "safetensors (state_dict)"
    readable(out)
    return {
        "model_file": str(model_file.relative_to(out)),
        "model_format": model_format,
        "source_format": found,
    }


def readable(folder: Path) -> None:
    """Files 0644 and folders 0755 below ``folder`` (mkstemp and some writers make 0600)."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, DIR_MODE if path.is_dir() else FILE_MODE)


def files(folder: str | os.PathLike) -> dict[str, int]:
    """Every file below ``folder`` (relative path -> bytes)."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()
    }
