"""Least-squares refit of the layers that read removed units (the units' consumers).

When units leave, the layer that read them (an FFN's output projection, an attention
output projection, the next convolution or Linear) loses some of its inputs. The refit
solves, per consumer, for the weights on its kept inputs and its bias that best reproduce
the dense layer's output Y on the calibration batches:

    min_{W', b'} || X~_kept W'^T + b' - Y ||^2 + ridge

with X~ the consumer's inputs in the pruned model (removed units masked, a joint
reconstruction's weights in place), gathered beside the dense model as the sums
[X~, 1]^T [X~, 1] and [X~, 1]^T Y (float32 per batch, summed in float64). Consumers are
refitted one after another in module order, each on the inputs that its already refitted
producers give (one calibration pass per consumer, cut short once the consumer has run).
Linear layers and
non-grouped Conv2d (through unfolded patches) are refitted; other consumers are left as
they are.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .groups import UnitMap
from .units import apply_masks, expand_masks

MAX_FEATURES = 8192  # consumers with more inputs (times kernel size) are not refitted
RIDGE = 1e-4  # relative to the mean diagonal of the kept inputs' Gram matrix


def _kept_inputs(units: UnitMap, keep: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per consumer module: True for every input feature (column / in-channel) kept."""
    out: dict[str, torch.Tensor] = {}
    for g in units.groups:
        if g.name not in keep:
            continue
        for m in g.members:
            if m.axis != 1 or m.leaf != "weight" or m.buffer:
                continue
            per_index = keep[g.name].bool().repeat_interleave(m.width)
            out[m.module] = out[m.module] & per_index if m.module in out else per_index
    return out


def _features(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    if _features_size(module) is not None:
        cols = F.unfold(
            x,
            module.kernel_size,
            dilation=module.dilation,
            padding=module.padding,
            stride=module.stride,
        )
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return None


def _expand(kept: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return kept.repeat_interleave(k)
    return kept


def _outputs_2d(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return y.flatten(2).transpose(1, 2).reshape(-1, y.shape[1])
    return y.reshape(-1, y.shape[-1])


class _Captured(Exception):
    """Raised by a capture hook once every consumer's tensors of a batch are in."""


@torch.no_grad()
def gram_matrices(
    pruned: nn.Module,
    dense: nn.Module,
    consumers: Iterable[str],
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per consumer, over ``batches``: the Gram matrix of [X, 1] with X its inputs in the
    ``pruned`` model, and [X, 1]^T Y with Y its outputs in the ``dense`` model (float64)."""
    consumers = list(consumers)
    inputs: dict[str, torch.Tensor] = {}
    targets: dict[str, torch.Tensor] = {}
    sums: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name in consumers:

        def take_x(mod, args, _out, name=name):
            inputs[name] = _features(mod, args[0].detach())
            if len(inputs) == len(consumers):
                raise _Captured  # the rest of the forward pass is not needed

        def take_y(mod, _args, out, name=name):
            targets[name] = _outputs_2d(mod, out.detach())
            if len(targets) == len(consumers):
                raise _Captured

        handles.append(pruned.get_submodule(name).register_forward_hook(take_x))
        handles.append(dense.get_submodule(name).register_forward_hook(take_y))
    try:
        for batch in batches:
            for model in (dense, pruned):
                try:
                    run(model, batch)
                except _Captured:
                    pass
            for name in consumers:
                x = inputs.pop(name, None)
                y = targets.pop(name, None)
                if x is None or y is None:
                    continue
                x = torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], 1)
                gxx, gxy = (x.T @ x).double(), (x.T @ y.float()).double()  # summed in float64
                if name in sums:
                    gxx, gxy = sums[name][0] + gxx, sums[name][1] + gxy
                sums[name] = (gxx, gxy)
    finally:
        for h in handles:
            h.remove()
    return sums


def _solve(
    gxx: torch.Tensor, gxy: torch.Tensor, kept: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [W', b'] over the kept features (and the constant, ``with_bias``), one row
    per output, minimising the squared error to Y given the Gram sums."""
    idx = kept.nonzero().flatten()
    if with_bias:
        idx = torch.cat([idx, torch.tensor([gxx.shape[0] - 1])])
    gkk = gxx[idx][:, idx]
    ridge = RIDGE * gkk.diagonal().mean().clamp_min(1e-12)
    gkk = gkk + ridge * torch.eye(idx.numel(), dtype=gxx.dtype)
    return torch.linalg.solve(gkk, gxy[idx]).T, idx


@torch.no_grad()
def refit_consumers(
    model: nn.Module,
    dense: nn.Module,
    units: UnitMap,
    keep: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
) -> list[str]:
    """Refit, in ``model`` (same shapes as ``dense``, its weights possibly reconstructed),
    every consumer of a removed unit: its inputs are those of ``model`` with the removed
    units masked and the consumers before it refitted (what the shrunk model computes), its
    target the dense layer's output.
    Returns the refitted module names. Removed inputs get weight 0."""
    kept = {n: k for n, k in _kept_inputs(units, keep).items() if not bool(k.all())}
    modules = {n: dense.get_submodule(n) for n in kept}
    kept = {
        n: _expand(k, modules[n])
        for n, k in kept.items()
        if _features_size(modules[n]) is not None and _features_size(modules[n]) <= MAX_FEATURES
    }
    masks = expand_masks(model, units, keep)
    pruned = apply_masks(copy.deepcopy(model), masks).eval()
    batches = list(batches)
    order = [n for n, _ in dense.named_modules() if n in kept]
    done = []
    for name in order:  # in module order, each on the inputs its refitted producers give
        sums = gram_matrices(pruned, dense, [name], batches, run)
        if name not in sums:
            continue
        k = kept[name]
        target = model.get_submodule(name)
        with_bias = target.bias is not None
        solved, idx = _solve(*sums[name], k, with_bias)
        cols = idx[:-1] if with_bias else idx
        new_w = torch.zeros(target.weight.shape[0], k.numel(), dtype=torch.float64)
        new_w[:, cols] = solved[:, : cols.numel()]
        for m in (target, pruned.get_submodule(name)):
            m.weight.copy_(new_w.reshape(m.weight.shape).to(m.weight.dtype))
            if with_bias:
                m.bias.copy_(solved[:, -1].to(m.bias.dtype))
        apply_masks(pruned, {t: v for t, v in masks.items() if t.startswith(f"{name}.")})
        done.append(name)
    return done


def _features_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return None
