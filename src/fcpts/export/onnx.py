"""Write a model as ``model.onnx`` that onnxruntime runs without fcpts or torch.

A Hugging Face encoder (its ``forward`` takes ``input_ids``) gets the inputs
``input_ids``, ``attention_mask`` and ``token_type_ids`` (those its ``forward`` accepts),
with dynamic batch and sequence axes, and one output, ``last_hidden_state`` (the model's
first output; ``logits`` for a model with a language-model head). Any other model keeps the names of its ``forward`` arguments (``x``) with a
dynamic batch axis, and its first output is ``output``.

torch's exporter (torch.export, ``dynamo=True``) is used: the TorchScript exporter traces
transformers 5's attention masks as constants and gets BERT wrong. Everything goes into one
file (no external data), so the file alone is the model.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError

ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
FILE_NAME = "model.onnx"


class FirstOutput(nn.Module):
    """Calls the model with named inputs and returns its first output as a plain tensor."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs, strict=True)))
        if hasattr(out, "last_hidden_state"):
            return out.last_hidden_state
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


def _parameters(model: nn.Module) -> list[str]:
    return list(inspect.signature(model.forward).parameters)


def is_encoder(model: nn.Module) -> bool:
    return "input_ids" in _parameters(model)


def _at_least_two(t: torch.Tensor) -> torch.Tensor:
    """torch.export fixes an axis of size 1 as a constant: show it two rows instead."""
    return t.repeat(2, *([1] * (t.dim() - 1))) if t.shape[0] == 1 else t


def example_inputs(
    model: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None
) -> dict[str, torch.Tensor]:
    """The named inputs of the exported graph, from one example call."""
    kwargs = dict(kwargs or {})
    params = _parameters(model)
    if is_encoder(model):
        if "input_ids" not in kwargs:
            raise UserError("exporting an encoder needs an example batch with input_ids")
        ids = kwargs["input_ids"]
        defaults = {"attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        return {n: kwargs.get(n, defaults.get(n)) for n in ENCODER_INPUTS if n in params}
    named = dict(zip(params, args, strict=False)) | kwargs
    return {n: v for n, v in named.items() if isinstance(v, torch.Tensor)}


@dataclass
class Graph:
    """What an exporter traces: the model behind named inputs returning its first output,
    one example of each input (batch of at least two), their dynamic axes, the output's
    name."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    shapes: tuple[dict[int, Any], ...]
    output: str


def graph(model: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Graph:
    """The :class:`Graph` of ``model`` from one example call."""
    inputs = {n: _at_least_two(t) for n, t in example_inputs(model, args, kwargs).items()}
    batch = torch.export.Dim("batch")
    if is_encoder(model):
        seq = torch.export.Dim("sequence")
        shapes = tuple({0: batch, 1: seq} for _ in inputs)
        with torch.no_grad():
            out = model(**inputs)
        output = (
            "logits"
            if hasattr(out, "logits") and not hasattr(out, "last_hidden_state")
            else "last_hidden_state"
        )
    else:
        shapes = tuple({0: batch} for _ in inputs)
        output = "output"
    return Graph(FirstOutput(model, tuple(inputs)).eval(), inputs, shapes, output)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No warnings nor the exporter's log lines (e.g. about torchvision ops) while exporting."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def export_onnx(
    model: nn.Module,
    folder: str | Path,
    args: tuple = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``folder/model.onnx`` from ``model`` and one example call; returns its path."""
    g = graph(model, args, kwargs)
    path = Path(folder) / FILE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with quiet():
        torch.onnx.export(
            g.module,
            tuple(g.inputs.values()),
            str(path),
            input_names=list(g.inputs),
            output_names=[g.output],
            dynamic_shapes=(g.shapes,),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return path


def run_onnx(path: str | Path, inputs: Mapping[str, Any]) -> np.ndarray:
    """The first output of ``path`` on onnxruntime's CPU provider; extra inputs are ignored."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = [i.name for i in session.get_inputs()]
    feeds = {n: np.asarray(torch.as_tensor(inputs[n]).numpy()) for n in wanted}
    return session.run(None, feeds)[0]
