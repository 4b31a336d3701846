"""Layer discovery on TorchScript models, through an eager mirror of their prunable layers."""

from __future__ import annotations

from types import MappingProxyType

import torch
from torch import nn

from .models import ResolvedModel

SCRIPTED_TYPES = MappingProxyType(
    {"Linear": nn.Linear, "Conv1d": nn.Conv1d, "Conv2d": nn.Conv2d, "Conv3d": nn.Conv3d}
)


class ScriptedLayers(nn.Module):
    """An eager stand-in for a TorchScript model's prunable layers, for layer discovery.

    TorchScript modules are not instances of ``nn.Linear``/``nn.ConvNd``; this mirror holds
    real modules of those types at the same names whose weights *are* the scripted
    model's parameters, so allocations computed on it apply to the scripted model.
    """

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        for name, module in scripted.named_modules():
            kind = getattr(module, "original_name", "")
            weight = getattr(module, "weight", None) if kind in SCRIPTED_TYPES else None
            if not isinstance(weight, torch.Tensor):
                continue
            if kind == "Linear":
                mirror: nn.Module = nn.Linear(
                    weight.shape[1], weight.shape[0], bias=False, device="meta"
                )
            else:
                groups = int(getattr(module, "groups", 1))
                mirror = SCRIPTED_TYPES[kind](
                    weight.shape[1] * groups,
                    weight.shape[0],
                    tuple(weight.shape[2:]),
                    groups=groups,
                    bias=False,
                    device="meta",
                )
            mirror.weight = (
                weight
                if isinstance(weight, nn.Parameter)
                else nn.Parameter(weight, requires_grad=False)
            )
            self._attach(name, mirror)

    def _attach(self, name: str, module: nn.Module) -> None:
        parent: nn.Module = self
        parts = name.split(".")
        for part in parts[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(parts[-1], module)


def layer_view(resolved: ResolvedModel) -> nn.Module:
    """The module whose prunable layers fcpts discovers (the model, or a TorchScript mirror)."""
    return ScriptedLayers(resolved.model) if resolved.scripted else resolved.model
