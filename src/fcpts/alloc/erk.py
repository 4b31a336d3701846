"""Erdos-Renyi-Kernel allocation (Evci et al., 2020).

Layer density is proportional to (sum of the weight's dimensions) / (their product), so
small layers stay denser; one scale factor is solved so the global density is 1 - S*.
Layers that the formula would make denser than their bounds allow are clipped and the
rest rescaled, by bisection on the scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ..layers import LayerSpec
from .base import Allocator, Problem, Proposal


def erk_sparsities(layers: Sequence[LayerSpec], target: float) -> dict[str, float]:
    """ERK per-layer sparsities whose parameter-weighted mean is ``target`` when feasible."""
    raw = {layer.name: sum(layer.shape) / layer.numel for layer in layers}
    total = sum(layer.numel for layer in layers)
    want_dense = (1.0 - target) * total

    def densities(log_eps: float) -> dict[str, float]:
        eps = math.exp(log_eps)
        return {
            layer.name: min(
                1.0 - layer.min_sparsity, max(1.0 - layer.max_sparsity, eps * raw[layer.name])
            )
            for layer in layers
        }

    def kept(log_eps: float) -> float:
        d = densities(log_eps)
        return sum(d[layer.name] * layer.numel for layer in layers)

    lo, hi = -60.0, 60.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if kept(mid) < want_dense:
            lo = mid
        else:
            hi = mid
    return {name: 1.0 - d for name, d in densities(hi).items()}


class ERK(Allocator):
    name = "erk"

    def propose(self, problem: Problem) -> Proposal:
        return Proposal(sparsities=erk_sparsities(problem.layers, problem.target))
