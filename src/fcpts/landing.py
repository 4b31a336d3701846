"""Exact landing: turn any per-layer proposal into masks with exactly round(S* x N) zeros.

Every allocator proposes something per layer (a target sparsity, or a score threshold).
Both become a *key* per weight that is monotone in the weight's score within its layer,
so that "prune every weight whose key is below a shared offset" reproduces the proposal
at offset zero. Landing then prunes the K = round(S* x N) weights with the smallest keys,
subject to each layer's count bounds: a closed-form version of bisecting one shared
offset of all log-thresholds, with ties broken by layer order then by score order.

Weights that are already zero (in the weights that will be written) are pruned first:
each layer's fewest zeros include them, so the written weights hold exactly K zeros.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .errors import UserError
from .layers import LayerSpec


def target_zeros(target: float, layers: Sequence[LayerSpec]) -> int:
    total = sum(layer.numel for layer in layers)
    return int(math.floor(target * total + 0.5))


def check_target(target: float) -> float:
    try:
        target = float(target)
    except (TypeError, ValueError):
        raise UserError(f"target sparsity must be a number in (0, 1), got {target!r}") from None
    if not (0.0 < target < 1.0) or math.isnan(target):
        raise UserError(
            f"target sparsity must be strictly between 0 and 1 (e.g. 0.7 for 70% zeros), got {target}"
        )
    return target


def zero_counts(weights: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """How many entries of each weight are exactly zero."""
    return {name: int((w == 0).sum()) for name, w in weights.items()}


def count_bounds(
    layers: Sequence[LayerSpec], existing: Mapping[str, int] | None = None
) -> tuple[dict[str, int], dict[str, int]]:
    """Fewest and most zeros per layer: the layer's bounds, raised to its ``existing``
    zeros (a weight that is already zero stays zero, whatever the bounds say)."""
    existing = existing or {}
    lo = {layer.name: max(layer.min_zeros(), existing.get(layer.name, 0)) for layer in layers}
    hi = {layer.name: max(layer.max_zeros(), existing.get(layer.name, 0)) for layer in layers}
    return lo, hi


def check_feasible(
    target: float, layers: Sequence[LayerSpec], existing: Mapping[str, int] | None = None
) -> int:
    """K for this target, or a UserError naming the bounds (or the zeros already in the
    weights, ``existing`` per layer) that make it unreachable."""
    k = target_zeros(target, layers)
    total = sum(layer.numel for layer in layers)
    lo_by, hi_by = count_bounds(layers, existing)
    lo, hi = sum(lo_by.values()), sum(hi_by.values())
    if k < lo and k >= sum(layer.min_zeros() for layer in layers):
        have = sum((existing or {}).values())
        raise UserError(
            f"target {target} asks for {k} zeros but the weights already hold {have} zeros "
            f"({have / total:.4f} of the prunable weights), which stay zero: raise the target "
            f"to at least {math.ceil(lo / total * 1e4) / 1e4:g}"
        )
    if k < lo:
        binding = [layer.name for layer in layers if layer.min_sparsity > 0]
        raise UserError(
            f"target {target} asks for {k} zeros but the min-sparsity bounds force at least "
            f"{lo} ({lo / total:.4f}); lower min_sparsity on {binding[:5]} or raise the target"
        )
    if k > hi:
        binding = [layer.name for layer in layers if layer.max_sparsity < 1]
        raise UserError(
            f"target {target} asks for {k} zeros but the max-sparsity bounds and keep-dense "
            f"layers allow at most {hi} ({hi / total:.4f}); raise max_sparsity or un-keep "
            f"{binding[:5]}, or lower the target"
        )
    return k


def sorted_scores(
    scores: Mapping[str, torch.Tensor], zeros: Mapping[str, torch.Tensor] | None = None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: scores sorted ascending (stable) and the flat indices of that order.

    ``zeros`` marks weights that are already zero: they score the layer's lowest (0 for
    non-negative scores) and come first among equal scores, so they are pruned first.
    """
    out = {}
    for name, s in scores.items():
        flat = s.detach().reshape(-1).float()
        zero = None if zeros is None else zeros[name].reshape(-1).to(flat.device)
        if zero is None or not bool(zero.any()):
            values, order = torch.sort(flat, stable=True)
            out[name] = (values, order)
            continue
        flat = flat.masked_fill(zero, min(0.0, float(flat.min())))
        first = torch.argsort((~zero).to(torch.int8), stable=True)
        order = first[torch.sort(flat[first], stable=True).indices]
        out[name] = (flat[order], order)
    return out


def keys_from_sparsities(
    sorted_values: Mapping[str, torch.Tensor], sparsities: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Quantile keys: position (r + 1/2)/n minus the proposed sparsity of the layer."""
    keys = {}
    for name, values in sorted_values.items():
        n = values.numel()
        pos = (torch.arange(n, dtype=torch.float64, device=values.device) + 0.5) / n
        keys[name] = pos - float(sparsities[name])
    return keys


def keys_from_thresholds(
    sorted_values: Mapping[str, torch.Tensor], thresholds: Mapping[str, float]
) -> dict[str, torch.Tensor]:
    """Ratio keys m / t_l - 1: a shared offset on log t_l moves every layer alike."""
    keys = {}
    for name, values in sorted_values.items():
        t = max(float(thresholds[name]), 1e-30)
        keys[name] = values.double() / t - 1.0
    return keys


def land_counts(
    keys: Mapping[str, torch.Tensor],
    layers: Sequence[LayerSpec],
    k: int,
    existing: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Zeros per layer: the k smallest keys overall, within each layer's bounds and at
    least its ``existing`` zeros (which :func:`sorted_scores` put first).

    ``keys[name]`` must be non-decreasing (keys of the layer's sorted scores).
    """
    lo, hi = count_bounds(layers, existing)
    counts = dict(lo)
    remaining = k - sum(lo.values())
    if remaining < 0 or remaining > sum(hi[n] - lo[n] for n in hi):
        raise UserError(f"cannot place {k} zeros within the layer bounds")
    if remaining == 0:
        return counts
    parts = [keys[layer.name][lo[layer.name] : hi[layer.name]] for layer in layers]
    owner = torch.cat([torch.full((p.numel(),), i, dtype=torch.int64) for i, p in enumerate(parts)])
    flat = torch.cat([p.double().cpu() for p in parts])
    # the remaining-th smallest key; everything strictly below it is pruned, ties fill up
    kth = torch.kthvalue(flat, remaining).values
    below = flat < kth
    tie_idx = torch.nonzero(flat == kth).reshape(-1)[: remaining - int(below.sum())]
    chosen = below.clone()
    chosen[tie_idx] = True
    per_layer = torch.bincount(owner[chosen], minlength=len(parts))
    for i, layer in enumerate(layers):
        counts[layer.name] += int(per_layer[i])
    return counts


def masks_from_counts(
    order: Mapping[str, torch.Tensor],
    counts: Mapping[str, int],
    shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, torch.Tensor]:
    """Keep-masks (True = keep) that zero the ``counts[name]`` lowest-scored weights."""
    masks = {}
    for name, idx in order.items():
        mask = torch.ones(idx.numel(), dtype=torch.bool, device=idx.device)
        mask[idx[: counts[name]]] = False
        masks[name] = mask.reshape(shapes[name])
    return masks
