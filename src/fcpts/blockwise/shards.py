"""Weights read lazily from a Hugging Face folder's safetensors shards.

Only the tensors asked for are read (``safe_open``: memory-mapped, one tensor at a time),
so a model larger than memory is never loaded whole.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ShardReader:
    """Where every tensor of a folder lives, and reading them by name or by prefix."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE).is_file():
            with safe_open(str(self.folder / SINGLE), framework="pt") as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise UserError(
                f"{self.folder} holds no safetensors weights ({SINGLE} or {INDEX}): the "
                "block-wise path reads safetensors shards; save the model with save_pretrained"
            )
        self.weight_map: dict[str, str] = dict(weight_map)

    def names(self) -> list[str]:
        return sorted(self.weight_map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The named tensors, each file opened once, as float32 copies."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out = {}
        for file, members in sorted(by_file.items()):
            with safe_open(str(self.folder / file), framework="pt") as f:
                for name in members:
                    t = f.get_tensor(name)
                    out[name] = t.float() if t.is_floating_point() else t
        return out

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed without it."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.read(names).items()}
