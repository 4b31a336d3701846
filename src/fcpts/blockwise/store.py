"""Calibration activations held within a memory bound and spilled to disk beyond it.

A store is a list of tensors (one per calibration batch). Entries stay in memory while
the store's in-memory bytes are within ``limit_bytes``; any entry that would exceed it is
written to ``spill_dir`` as a safetensors file and read back when asked for. ``save``
writes every entry to a folder (the per-block checkpoint), ``load`` reads one back lazily.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _entry_file(folder: Path, i: int) -> Path:
    return folder / f"act-{i:05d}.safetensors"


class ActivationStore:
    def __init__(self, limit_bytes: int, spill_dir: str | os.PathLike) -> None:
        self.limit = int(limit_bytes)
        self.spill_dir = Path(spill_dir)
        self.entries: list[torch.Tensor | Path] = []
        self.in_memory = 0
        self.spilled = 0

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.in_memory + size <= self.limit:
            self.entries.append(tensor)
            self.in_memory += size
            return
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = _entry_file(self.spill_dir, len(self.entries))
        save_file({"x": tensor}, str(path))
        self.entries.append(path)
        self.spilled += 1

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> torch.Tensor:
        entry = self.entries[i]
        return load_file(str(entry))["x"] if isinstance(entry, Path) else entry

    def save(self, folder: str | os.PathLike) -> None:
        """Every entry as a file in ``folder`` (written to a temporary folder, then renamed)."""
        folder = Path(folder)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for i in range(len(self)):
            save_file({"x": self[i]}, str(_entry_file(tmp, i)))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)

    @classmethod
    def load(cls, folder: str | os.PathLike, limit_bytes: int, spill_dir) -> ActivationStore:
        """The store saved in ``folder``, its entries read within the memory bound."""
        store = cls(limit_bytes, spill_dir)
        files = sorted(Path(folder).glob("act-*.safetensors"))
        for path in files:
            store.append(load_file(str(path))["x"])
        return store

    def clear(self) -> None:
        self.entries.clear()
        self.in_memory = 0
        shutil.rmtree(self.spill_dir, ignore_errors=True)
