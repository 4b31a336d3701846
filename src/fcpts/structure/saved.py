"""A shrunk model's manifest section, and how fcpts rebuilds the model from it.

A shrunk Hugging Face model's config no longer describes its shapes (heads and FFN widths
differ per layer), so the manifest's ``units`` section records the unit groups (their
members: tensor, axis, width), the kept unit indices of each group and the shape of every
tensor that changed. :func:`rebuild` cuts the dense source model down to those shapes
(``fcpts.structure.shrink``) before the saved weights are loaded into it. Without fcpts,
the folder's ``model.onnx`` runs the shrunk model in onnxruntime.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .groups import Member, UnitGroup, UnitMap
from .shrink import shrink

FORMAT = "fcpts.units/1"


def units_section(
    units: UnitMap, keep: Mapping[str, torch.Tensor], small: nn.Module
) -> dict[str, Any]:
    """The manifest section that lets :func:`rebuild` recreate ``small``."""
    state = small.state_dict()
    touched = sorted({m.tensor for g in units.groups if g.name in keep for m in g.members})
    return {
        "format": FORMAT,
        "groups": [
            {
                "name": g.name,
                "kind": g.kind,
                "count": g.count,
                "attention": g.attention,
                "head_size": g.head_size,
                "members": [[m.tensor, m.axis, m.width, m.buffer] for m in g.members],
                "kept": keep[g.name].nonzero().flatten().tolist(),
            }
            for g in units.groups
            if g.name in keep
        ],
        "shapes": {t: list(state[t].shape) for t in touched if t in state},
    }


def _unit_map(section: Mapping[str, Any]) -> tuple[UnitMap, dict[str, torch.Tensor]]:
    groups, keep = [], {}
    for g in section["groups"]:
        members = tuple(Member(t, int(a), int(w), bool(b)) for t, a, w, b in g["members"])
        groups.append(
            UnitGroup(
                g["name"], g["kind"], int(g["count"]), members, g["attention"], g["head_size"]
            )
        )
        k = torch.zeros(int(g["count"]), dtype=torch.bool)
        k[torch.tensor(g["kept"], dtype=torch.long)] = True
        keep[g["name"]] = k
    return UnitMap(tuple(groups)), keep


def rebuild(model: nn.Module, manifest: Mapping[str, Any]) -> nn.Module:
    """A copy of ``model`` with the shapes the manifest's ``units`` section records (the
    copy itself when the manifest has none)."""
    section = manifest.get("units")
    if not section:
        return copy.deepcopy(model)
    if section.get("format") != FORMAT:
        raise UserError(
            f"the manifest's units section has format {section.get('format')!r}, this fcpts "
            f"reads {FORMAT}: rerun `fcpts allocate --structure units`"
        )
    units, keep = _unit_map(section)
    try:
        small = shrink(model, units, keep)
    except (KeyError, AttributeError, IndexError, RuntimeError) as exc:
        raise UserError(
            f"the shrunk model's units do not fit this model ({type(exc).__name__}: {exc}): "
            "evaluate it with the dense model it was allocated from"
        ) from None
    state = small.state_dict()
    for t, shape in section.get("shapes", {}).items():
        if t in state and list(state[t].shape) != list(shape):
            raise UserError(
                f"rebuilt tensor {t} has shape {list(state[t].shape)}, the manifest records "
                f"{shape}: evaluate with the dense model it was allocated from"
            )
    return small
