"""What a model costs under each budget, and what one unit of a group costs.

- ``params``: the number of parameters (shared ones counted once).
- ``flops``: multiply-accumulates per sample at the calibration input shape, measured by
  forward hooks on a real forward pass: every Linear and Conv weight times the positions it
  is applied at (tokens, output pixels), plus the two attention matmuls (Q K^T and A V,
  ``2 * queries * keys * head_size`` per head) of every BERT-style self-attention.
  Normalisation, activations, pooling and biases are not counted.
- ``bytes``: the size of the model written as one safetensors file, header included.

A unit's bytes are its tensors' elements (running statistics included) times their element
size; the file's JSON header shrinks by a few characters as well, so a budget in bytes lands
to within one unit and a handful of header bytes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .budget import CostModel, cost_model
from .groups import UnitMap
from .units import UnitGroup, unit_slice_numel

BUDGETS = ("params", "flops", "bytes")
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Profile:
    """Per-sample use of each layer in one forward pass."""

    positions: Mapping[str, int] = field(default_factory=dict)  # weight applications
    attention: Mapping[str, int] = field(default_factory=dict)  # sum of queries * keys
    macs: int = 0


@dataclass(frozen=True)
class Cost:
    params: int
    flops: int
    bytes: int

    def of(self, budget: str) -> int:
        return getattr(self, check_budget(budget))


def check_budget(budget: str) -> str:
    if budget not in BUDGETS:
        raise UserError(f"unknown budget {budget!r}: choose one of {', '.join(BUDGETS)}")
    return budget


def is_self_attention(module: nn.Module) -> bool:
    return hasattr(module, "attention_head_size") and all(
        isinstance(getattr(module, p, None), nn.Linear) for p in ("query", "key", "value")
    )


def _positions(module: nn.Module, out: torch.Tensor) -> int:
    """Positions per sample that one call applied the weight at (output pixels, tokens)."""
    if isinstance(module, _CONVS):
        return out[0, 0].numel()
    if out.dim() < 2:
        return 1
    return out[0].numel() // out.shape[-1]


def profile(model: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Profile:
    """Run ``model(*args, **kwargs)`` once and record what each layer does per sample."""
    positions: dict[str, int] = {}
    attention: dict[str, int] = {}
    handles = []

    def layer_hook(name: str):
        def hook(module, inputs, out):
            positions[name] = positions.get(name, 0) + _positions(module, out)

        return hook

    def attention_hook(name: str):
        def hook(module, inputs, kw):
            hidden = inputs[0] if inputs else kw["hidden_states"]
            attention[name] = attention.get(name, 0) + hidden.shape[1] * hidden.shape[1]

        return hook

    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, *_CONVS)):
            handles.append(m.register_forward_hook(layer_hook(name)))
        if is_self_attention(m):
            handles.append(m.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **dict(kwargs or {}))
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    macs = sum(modules[n].weight.numel() * p for n, p in positions.items())
    macs += sum(2 * qk * modules[n].query.out_features for n, qk in attention.items())
    return Profile(positions, attention, int(macs))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def path_bytes(path: str | Path) -> int:
    """Size of a written file, or of every file under a folder."""
    p = Path(path)
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return p.stat().st_size


def written_bytes(model: nn.Module) -> int:
    """Size of ``model`` written as a safetensors file (parameters and buffers, header too)."""
    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        save_model(model, str(path))
        return path_bytes(path)


def model_cost(model: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None) -> Cost:
    return Cost(count_params(model), profile(model, args, kwargs).macs, written_bytes(model))


def unit_cost(model: nn.Module, group: UnitGroup, budget: str, prof: Profile | None = None) -> int:
    """What removing one unit of ``group`` saves under ``budget`` (every unit costs the same).

    ``flops`` needs the ``Profile`` of a forward pass at the calibration input shape."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    check_budget(budget)
    if budget == "flops" and prof is None:
        raise ValueError("unit_cost(budget='flops') needs a profile of a forward pass")
    total = 0
    for m in group.members:
        t = tensors[m.tensor]
        n = unit_slice_numel(t.shape, m)
        if budget == "params" and not m.buffer:
            total += n
        elif budget == "bytes":
            total += n * t.element_size()
        elif budget == "flops" and m.leaf == "weight":
            total += n * prof.positions.get(m.module, 0)
    if budget == "flops" and group.attention is not None:
        total += 2 * prof.attention.get(group.attention, 0) * group.head_size
    return total


def units_cost_model(
    model: nn.Module, units: UnitMap, budget: str, prof: Profile | None = None
) -> CostModel:
    """The exact cost, under ``budget``, of the tensors ``units`` slice, for any number of
    kept units per group (``flops`` needs the ``Profile`` of a forward pass)."""
    check_budget(budget)
    if budget == "flops" and prof is None:
        raise ValueError("units_cost_model(budget='flops') needs a profile of a forward pass")
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    buffers = set(dict(model.named_buffers()))
    shapes, per_element = {}, {}
    for g in units.groups:
        for m in g.members:
            t = tensors[m.tensor]
            shapes[m.tensor] = tuple(t.shape)
            if budget == "params":
                per_element[m.tensor] = 0 if m.tensor in buffers else 1
            elif budget == "bytes":
                per_element[m.tensor] = t.element_size()
            else:
                weight = m.leaf == "weight" and m.tensor not in buffers
                per_element[m.tensor] = prof.positions.get(m.module, 0) if weight else 0
    attention = {}
    if budget == "flops":
        attention = {
            g.name: 2 * prof.attention.get(g.attention, 0) * g.head_size
            for g in units.groups
            if g.attention is not None
        }
    return cost_model(units, shapes, per_element, attention)
