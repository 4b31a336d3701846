"""Removable unit groups of a model, and how a unit-level keep mask becomes weight masks.

A unit is the smallest piece that can leave a model as a whole and leave a smaller dense
model behind: an attention head or an FFN neuron of a Hugging Face BERT-style layer, or an
output channel of a convolution (with its BatchNorm entries and the input channels of the
layers that read it), or a hidden neuron between two Linear layers. Channels that a residual
addition couples form one group: channel k of every member is kept or removed together.

A group owns weight slices (``Member``): unit k owns the indices ``[k * width, (k + 1) *
width)`` of ``axis`` of each member tensor. Zeroing those slices (``expand_masks``) gives the
masked model; cutting them out (``fcpts.structure.shrink``) gives the same outputs from a
smaller model. Layers that cannot be proven safe to shrink are listed in ``UnitMap.blocked``
with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .groups import Blocked, Member, UnitGroup, UnitMap
from .trace import channel_units


def _is_linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def bert_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The BERT-style layers of a model: attention.self.{query,key,value}, attention.output.dense,
    intermediate.dense and output.dense, all Linear."""
    found = []
    for name, mod in model.named_modules():
        att = getattr(mod, "attention", None)
        sa = getattr(att, "self", None)
        parts = (
            getattr(sa, "query", None),
            getattr(sa, "key", None),
            getattr(sa, "value", None),
            getattr(getattr(att, "output", None), "dense", None),
            getattr(getattr(mod, "intermediate", None), "dense", None),
            getattr(getattr(mod, "output", None), "dense", None),
        )
        if all(_is_linear(p) for p in parts) and hasattr(sa, "attention_head_size"):
            found.append((name, mod))
    return found


def _rows_and_cols(producers: list[str], consumer: str, width: int) -> tuple[Member, ...]:
    rows = []
    for p in producers:
        rows += [Member(f"{p}.weight", 0, width), Member(f"{p}.bias", 0, width)]
    return (*rows, Member(f"{consumer}.weight", 1, width))


def _drop_missing(model: nn.Module, members: tuple[Member, ...]) -> tuple[Member, ...]:
    present = set(dict(model.named_parameters())) | set(dict(model.named_buffers()))
    return tuple(m for m in members if m.tensor in present)


def bert_units(model: nn.Module) -> UnitMap:
    """Heads and FFN neurons of every BERT-style layer; other Linear layers are blocked."""
    groups = []
    covered = set()
    for name, layer in bert_layers(model):
        pre = f"{name}." if name else ""
        sa = layer.attention.self
        d = int(sa.attention_head_size)
        heads = sa.query.out_features // d
        qkv = [f"{pre}attention.self.{p}" for p in ("query", "key", "value")]
        att_out = f"{pre}attention.output.dense"
        fc1, fc2 = f"{pre}intermediate.dense", f"{pre}output.dense"
        groups.append(
            UnitGroup(
                f"{pre}heads",
                "head",
                heads,
                _drop_missing(model, _rows_and_cols(qkv, att_out, d)),
                attention=f"{pre}attention.self",
                head_size=d,
            )
        )
        groups.append(
            UnitGroup(
                f"{pre}ffn",
                "neuron",
                layer.intermediate.dense.out_features,
                _drop_missing(model, _rows_and_cols([fc1], fc2, 1)),
            )
        )
        covered.update((*qkv, att_out, fc1, fc2))
    blocked = tuple(
        Blocked(n, "its outputs are the hidden size of the residual stream, kept whole")
        for n, m in model.named_modules()
        if _is_linear(m) and n not in covered
    )
    return UnitMap(tuple(groups), blocked)


def find_units(
    model: nn.Module, args: tuple = (), kwargs: Mapping[str, Any] | None = None
) -> UnitMap:
    """The removable unit groups of ``model``; ``args``/``kwargs`` are one example call.

    BERT-style encoders are read from their module structure; any other model is traced with
    torch.fx on the example call (``fcpts.structure.trace``)."""
    if bert_layers(model):
        return bert_units(model)

    return channel_units(model, tuple(args), dict(kwargs or {}))


def unit_slice_numel(shape: torch.Size | tuple[int, ...], member: Member) -> int:
    """Elements of one unit's slice of a tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= d
    return n // shape[member.axis] * member.width


def _axis_mask(keep: torch.Tensor, member: Member, shape: torch.Size) -> torch.Tensor:
    per_index = keep.bool().repeat_interleave(member.width)
    view = [1] * len(shape)
    view[member.axis] = shape[member.axis]
    return per_index.view(view).expand(shape)


def check_keep(group: UnitGroup, keep: torch.Tensor) -> torch.Tensor:
    keep = torch.as_tensor(keep).bool().flatten()
    if keep.numel() != group.count:
        raise UserError(
            f"unit mask for {group.name!r} has {keep.numel()} entries, the group has "
            f"{group.count} units: give one entry per unit"
        )
    return keep


def expand_masks(
    model: nn.Module, units: UnitMap, keep: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Weight masks (True = kept) of every parameter that a masked unit touches."""
    params = dict(model.named_parameters())
    masks: dict[str, torch.Tensor] = {}
    for name, k in keep.items():
        group = units.group(name)
        k = check_keep(group, k)
        for m in group.members:
            if m.buffer:
                continue
            shape = params[m.tensor].shape
            mask = _axis_mask(k, m, shape)
            masks[m.tensor] = masks[m.tensor] & mask if m.tensor in masks else mask.clone()
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> nn.Module:
    """Zero the masked-out weights of ``model`` in place; returns the model."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask.to(params[name].dtype))
    return model
