"""Least-squares refit of the layers that read removed units (the units' consumers).

When units leave, the layer that read them (an FFN's output projection, an attention
output projection, the next convolution or Linear) loses some of its inputs. The refit
solves, per consumer, for the weights on its kept inputs and its bias that best reproduce
the dense layer's output on the calibration activations:

    min_{W', b'} || X_kept W'^T + b' - (X W^T + b) ||^2 + ridge

with X the consumer's inputs in the dense model, gathered once as the Gram matrix of
[X, 1] over the calibration batches (float32 per batch, summed in float64). Linear layers and non-grouped Conv2d
(through unfolded patches) are refitted; other consumers are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .groups import UnitMap

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


@torch.no_grad()
def gram_matrices(
    model: nn.Module,
    consumers: Iterable[str],
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
) -> dict[str, torch.Tensor]:
    """The Gram matrix of [inputs, 1] of each consumer over ``batches`` (float64)."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name in consumers:
        module = model.get_submodule(name)

        def hook(mod, args, _out, name=name):
            x = _features(mod, args[0].detach())
            if x is None:
                return
            x = torch.cat([x.float(), x.new_ones(x.shape[0], 1, dtype=torch.float32)], 1)
            g = (x.T @ x).double()  # float32 per batch, summed in float64
            grams[name] = grams[name] + g if name in grams else g

        handles.append(module.register_forward_hook(hook))
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    return grams


def _solve(
    gram: torch.Tensor, kept: torch.Tensor, target: torch.Tensor, with_bias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [W', b'] over the kept features (and the constant, ``with_bias``) that
    reproduce ``target`` ([W, b], one row per output) under the Gram matrix of [X, 1]."""
    idx = kept.nonzero().flatten()
    if with_bias:
        idx = torch.cat([idx, torch.tensor([gram.shape[0] - 1])])
    gkk = gram[idx][:, idx]
    ridge = RIDGE * gkk.diagonal().mean().clamp_min(1e-12)
    gkk = gkk + ridge * torch.eye(idx.numel(), dtype=gram.dtype)
    rhs = gram[idx] @ target.T
    return torch.linalg.solve(gkk, rhs).T, idx


@torch.no_grad()
def refit_consumers(
    model: nn.Module,
    dense: nn.Module,
    units: UnitMap,
    keep: Mapping[str, torch.Tensor],
    batches: Iterable[Any],
    run: Callable[[nn.Module, Any], Any],
) -> list[str]:
    """Refit, in ``model`` (same shapes as ``dense``), every consumer of a removed unit;
    returns the refitted module names. Removed inputs get weight 0."""
    kept = {n: k for n, k in _kept_inputs(units, keep).items() if not bool(k.all())}
    modules = {n: dense.get_submodule(n) for n in kept}
    kept = {
        n: _expand(k, modules[n])
        for n, k in kept.items()
        if _features_size(modules[n]) is not None and _features_size(modules[n]) <= MAX_FEATURES
    }
    grams = gram_matrices(dense, kept, list(batches), run)
    done = []
    for name, k in kept.items():
        if name not in grams:
            continue
        d = modules[name]
        w = d.weight.reshape(d.weight.shape[0], -1).double()
        b = d.bias.double() if d.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        target = model.get_submodule(name)
        with_bias = target.bias is not None
        solved, idx = _solve(grams[name], k, torch.cat([w, b[:, None]], 1), with_bias)
        cols = idx[:-1] if with_bias else idx
        new_w = torch.zeros_like(w)
        new_w[:, cols] = solved[:, : cols.numel()]
        target.weight.copy_(new_w.reshape(target.weight.shape).to(target.weight.dtype))
        if with_bias:
            target.bias.copy_(solved[:, -1].to(target.bias.dtype))
        done.append(name)
    return done


def _features_size(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, nn.Conv2d) and module.groups == 1 and not isinstance(module.padding, str):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1]
    return None
