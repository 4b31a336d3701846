"""The thresholds fcpts learns, and the masks they make.

Each learned layer l has a log-threshold theta_l; its threshold on the scores is
t_l = exp(theta_l) * ref_l, with ref_l the median positive score, so that thetas are
comparable across layers of any scale. The mask keeps the weights scoring above t_l;
with the straight-through estimator its gradient to t_l is that of a sigmoid of width
``width`` (forward: the hard mask; backward: the sigmoid's).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..bridge import ScoreDistribution
from ..layers import LayerSpec
from .erk import erk_sparsities

THETA_LIMIT = 60.0  # |theta| bound of an unbounded layer: exp(60) spans any score range


def positive_median(values: torch.Tensor) -> float:
    """The median of the positive entries of sorted ``values`` (1.0 when none is)."""
    pos = values[values > 0]
    if pos.numel() == 0:
        return 1.0
    return float(pos[pos.numel() // 2])


def threshold_at(values: torch.Tensor, sparsity: float) -> float:
    """A threshold between the c-th and (c+1)-th smallest of sorted ``values``,
    c = round(sparsity * n), so that exactly c scores lie at or below it."""
    n = values.numel()
    c = min(n, max(0, round(sparsity * n)))
    if c == 0:
        return float(values[0]) * 0.5
    if c == n:
        return float(values[-1]) * 1.0001 + 1e-30
    return 0.5 * (float(values[c - 1]) + float(values[c]))


def initial_sparsities(layers: Sequence[LayerSpec], target: float, init: str) -> dict[str, float]:
    """The starting allocation: ERK, or the target in every layer (within its bounds)."""
    if init == "erk":
        return erk_sparsities(layers, target)
    return {
        layer.name: min(layer.max_sparsity, max(layer.min_sparsity, target)) for layer in layers
    }


def log_ratio(values: torch.Tensor, sparsity: float, ref: float) -> float:
    """theta = log(t / ref) for the threshold that gives ``sparsity`` (t at least ref * 1e-12)."""
    return math.log(max(threshold_at(values, sparsity), ref * 1e-12) / ref)


@dataclass
class Thresholds:
    """The learnable log-thresholds of the learned layers, in layer order, and what they
    need: the reference scale, the bounds on theta, the straight-through widths, and each
    layer's score distribution (for the bridge) and size."""

    names: list[str]
    theta: torch.Tensor
    ref: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    widths: list[float]
    dists: list[ScoreDistribution]
    numels: list[int]

    def values(self) -> torch.Tensor:
        """t = exp(theta) * ref, differentiable in theta."""
        return torch.exp(self.theta) * self.ref

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep every theta within the bounds its layer's min/max sparsity set."""
        self.theta.copy_(torch.maximum(torch.minimum(self.theta, self.hi), self.lo))

    @torch.no_grad()
    def final(self) -> dict[str, float]:
        """The thresholds t_l by layer name, as plain numbers."""
        return dict(zip(self.names, self.values().tolist(), strict=True))


def init_thresholds(
    layers: Sequence[LayerSpec],
    scores: Mapping[str, torch.Tensor],
    sparsities: Mapping[str, float],
    *,
    kde_samples: int,
    bridge: str,
    ste_width: float,
    generator: torch.Generator,
    device: torch.device,
) -> Thresholds:
    """Thetas that give ``sparsities`` in each of ``layers``, and their bounds.

    Each layer's score distribution draws its KDE subsample from ``generator``, in layer
    order. A layer's theta is bounded by the thresholds of its min/max sparsity (or by
    +-THETA_LIMIT where it has none); the straight-through width is ``ste_width`` KDE
    bandwidths of that layer.
    """
    dists, refs, theta0, lo, hi, widths = [], [], [], [], [], []
    for layer in layers:
        dist = ScoreDistribution(scores[layer.name].to(device), kde_samples, bridge, generator)
        values = dist.sorted
        ref = positive_median(values)
        dists.append(dist)
        refs.append(ref)
        theta0.append(log_ratio(values, sparsities[layer.name], ref))
        lo.append(
            log_ratio(values, layer.min_sparsity, ref) if layer.min_sparsity > 0 else -THETA_LIMIT
        )
        hi.append(
            log_ratio(values, layer.max_sparsity, ref) if layer.max_sparsity < 1 else THETA_LIMIT
        )
        widths.append(ste_width * dist.bandwidth)
    return Thresholds(
        names=[layer.name for layer in layers],
        theta=torch.tensor(theta0, dtype=torch.float32, device=device, requires_grad=True),
        ref=torch.tensor(refs, dtype=torch.float32, device=device),
        lo=torch.tensor(lo, device=device),
        hi=torch.tensor(hi, device=device),
        widths=widths,
        dists=dists,
        numels=[layer.numel for layer in layers],
    )


def layer_mask(
    scores: torch.Tensor, t: torch.Tensor, width: float, straight_through: bool
) -> torch.Tensor:
    """The keep-mask 1[m > t] as a float tensor; with ``straight_through`` its gradient to
    ``t`` is that of sigmoid((m - t) / width), the forward value stays the hard mask."""
    hard = (scores > t).to(scores.dtype)
    if not straight_through:
        return hard
    soft = torch.sigmoid((scores - t) / width)
    return hard + soft - soft.detach()
