"""Cut removed units out of a model: a smaller dense model with the masked model's outputs.

``shrink(model, units, keep)`` copies the model and slices every member tensor of every
group in ``keep`` (True = kept unit) down to the kept indices: Linear and Conv shapes,
BatchNorm entries and running statistics, the heads of BERT-style attention and the FFN
width of each layer. Its outputs equal those of the full model with the removed units'
weights zeroed (``fcpts.structure.units.expand_masks``), because every removed slice either
produces a channel that no kept weight reads, or reads one.

The shrunk model is an ``nn.Module``: a Hugging Face model keeps its config, whose
``num_attention_heads`` and ``intermediate_size`` no longer describe every layer, so ship it
as a state dict with this module's shapes or as ONNX (``fcpts.export.onnx``), not through
``save_pretrained``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .units import UnitMap, check_keep

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class NoHeads(nn.Module):
    """A self-attention with every head removed: its output has zero features."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _kept_indices(keep: torch.Tensor, width: int) -> torch.Tensor:
    units = keep.nonzero().flatten()
    return (units[:, None] * width + torch.arange(width)).flatten()


def _set_tensor(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[leaf] = value


def _fix_shapes(module: nn.Module) -> None:
    """Make a sliced module's size attributes agree with its weights."""
    if isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, _CONVS):
        out = module.weight.shape[0]
        if module.groups > 1 and module.groups == module.in_channels == module.out_channels:
            module.groups = module.in_channels = out
        else:
            module.in_channels = module.weight.shape[1] * module.groups
        module.out_channels = out
    elif isinstance(module, _BATCHNORMS):
        ref = module.weight if module.weight is not None else module.running_mean
        module.num_features = ref.shape[0]


def _fix_attention(model: nn.Module, path: str, heads: int, head_size: int) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if heads == 0:
        setattr(parent, leaf, NoHeads())
        return
    sa = getattr(parent, leaf)
    sa.num_attention_heads = heads
    sa.all_head_size = heads * head_size


@torch.no_grad()
def shrink(model: nn.Module, units: UnitMap, keep: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` without the units that ``keep`` marks False (one bool per unit)."""
    small = copy.deepcopy(model)
    touched = set()
    attention = []
    for name, k in keep.items():
        group = units.group(name)
        k = check_keep(group, k)
        for m in group.members:
            module = small.get_submodule(m.module) if m.module else small
            tensor = getattr(module, m.leaf)
            idx = _kept_indices(k, m.width).to(tensor.device)
            _set_tensor(module, m.leaf, tensor.index_select(m.axis, idx).contiguous())
            touched.add(m.module)
        if group.attention is not None:
            attention.append((group.attention, int(k.sum()), group.head_size))
    for path in touched:
        _fix_shapes(small.get_submodule(path) if path else small)
    for path, heads, head_size in attention:
        _fix_attention(small, path, heads, head_size)
    return small
