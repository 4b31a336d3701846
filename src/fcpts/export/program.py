"""Write a model as ``model.pt2``: a ``torch.export`` program that torch alone loads and
runs (``torch.export.load(path).module()(*inputs)``), with the same named inputs, dynamic
axes and first output as ``model.onnx`` (:func:`fcpts.export.onnx.graph`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .onnx import Graph, graph, quiet

FILE_NAME = "model.pt2"


def export_program(
    model: nn.Module,
    folder: str | Path,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
) -> tuple[Path, Graph]:
    """Write ``folder/model.pt2``; returns its path and the graph it traced."""
    g = graph(model, args, kwargs)
    path = Path(folder) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        program = torch.export.export(
            g.module, tuple(g.inputs.values()), dynamic_shapes=(g.shapes,)
        )
        torch.export.save(program, str(path))
    return path, g
