"""The two networks of fcpts's reconstruction: the frozen dense teacher and the student.

The student is a copy of the teacher whose learned layers run with masked weights (given
to the task as overrides); with joint reconstruction its kept weights, biases and norms
are trained too. Block outputs are captured by forward hooks on modules matched by name.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..layers import LayerSpec, matches
from ..tasks import Task


def block_modules(model: nn.Module, patterns: Sequence[str]) -> dict[str, nn.Module]:
    """The modules of ``model`` whose names match ``patterns`` (none without patterns)."""
    if not patterns:
        return {}
    found = {n: m for n, m in model.named_modules() if n and any(matches(n, p) for p in patterns)}
    if not found:
        raise UserError(f"fcpts setting blocks {list(patterns)} matches no module of the model")
    return found


@contextmanager
def captured(
    modules: Mapping[str, nn.Module], cache: dict[str, torch.Tensor]
) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, each module's output lands in ``cache`` under its name."""
    handles = []
    for name, module in modules.items():

        def hook(_m, _a, out, name=name):
            cache[name] = out[0] if isinstance(out, (tuple, list)) else out

        handles.append(module.register_forward_hook(hook))
    try:
        yield cache
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def teacher_outputs(
    teacher: nn.Module, task: Task, batches: Sequence[Any], modules: Mapping[str, nn.Module]
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Per batch: the teacher's task target and its captured block outputs."""
    out = []
    for batch in batches:
        with captured(modules, {}) as cache:
            raw = task.run(teacher, batch)
        out.append((task.target(raw, batch).detach(), dict(cache)))
    return out


@dataclass
class Student:
    """The network being reconstructed: its learned layers' weights (by layer name) and
    the other parameters trained with them (biases and norms, by parameter name)."""

    model: nn.Module
    weights: dict[str, nn.Parameter]
    extra: dict[str, nn.Parameter]
    view: Any = None  # units: the UnitView whose masks cover ``weights`` (by param name)

    def trained(self) -> dict[str, torch.Tensor]:
        """Every parameter that learning changes, under its checkpoint name."""
        return {f"param.{n}": p for n, p in self.model.named_parameters() if p.requires_grad}

    def masked(
        self, learn: Sequence[LayerSpec], masks: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The masked weights of the learned layers, as parameter overrides for the task."""
        if self.view is not None:
            return self.view.overrides(self.weights, learn, masks)
        return {
            layer.param_name: self.weights[layer.name] * mask
            for layer, mask in zip(learn, masks, strict=True)
        }


def make_student(
    teacher: nn.Module, layers: Sequence[LayerSpec], reconstruct: bool, view: Any = None
) -> Student:
    """A frozen copy of ``teacher``; with ``reconstruct`` its learned layers' weights and
    every bias and 1-d parameter (norms) outside the keep-dense layers train. With a
    ``view`` (units) the learned weights are the parameters the units own a slice of."""
    model = copy.deepcopy(teacher).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    learn = [layer for layer in layers if not layer.keep_dense]
    if view is not None:
        weights = view.params(model)
    else:
        weights = {layer.name: model.get_submodule(layer.name).weight for layer in learn}
    extra: dict[str, nn.Parameter] = {}
    if reconstruct:
        learn_names = set(weights) if view is not None else {layer.param_name for layer in learn}
        dense_names = {layer.param_name for layer in layers if layer.keep_dense}
        for name, p in model.named_parameters():
            if name in dense_names:
                continue
            if name in learn_names or name.endswith("bias") or p.dim() == 1:
                p.requires_grad_(True)
                if name not in learn_names:
                    extra[name] = p
    return Student(model, weights, extra, view)
