"""The differentiable bridge from a threshold to the sparsity it produces.

A layer's sparsity at threshold t is the empirical CDF of its scores, F(t) = #{m <= t}/n:
a step function whose gradient is zero almost everywhere. The bridge keeps the exact count
in the forward pass and uses a smooth density estimate p(t) as dF/dt in the backward pass
(FCPTS, Gong et al. 2024). Two estimates are offered: a Gaussian kernel density estimate
on a fixed subsample (the paper's description) and a 100-bin histogram (the official
code). Scores are non-negative, so the kernel is reflected at zero.
"""

from __future__ import annotations

import math

import torch

BRIDGES = ("kde", "hist")
_SQRT_2PI = math.sqrt(2.0 * math.pi)


def silverman_bandwidth(sample: torch.Tensor) -> float:
    """Silverman's rule with the IQR guard: 0.9 * min(sigma, IQR/1.349) * n^(-1/5)."""
    n = sample.numel()
    sigma = sample.std().item() if n > 1 else 0.0
    q75, q25 = torch.quantile(sample.double(), torch.tensor([0.75, 0.25], dtype=torch.float64))
    spread = min(sigma, (q75 - q25).item() / 1.349) or sigma
    if spread <= 0.0:
        spread = max(abs(sample.mean().item()), 1e-12)
    return 0.9 * spread * n ** (-0.2)


class ScoreDistribution:
    """Sorted scores of one layer plus a smooth density of them, fixed once."""

    def __init__(
        self,
        scores: torch.Tensor,
        kde_samples: int = 4096,
        method: str = "kde",
        generator: torch.Generator | None = None,
        reflect: bool = True,
    ) -> None:
        if method not in BRIDGES:
            raise ValueError(f"bridge must be one of {BRIDGES}, got {method!r}")
        flat = scores.detach().reshape(-1).float()
        self.sorted, _ = torch.sort(flat)
        self.n = flat.numel()
        if self.n > kde_samples:
            idx = torch.randperm(self.n, generator=generator)[:kde_samples].to(flat.device)
            self.sample = flat[idx]
        else:
            self.sample = flat.clone()
        self.method = method
        self.reflect = reflect
        self.bandwidth = silverman_bandwidth(self.sample.cpu())
        if method == "hist":
            hi = self.sorted[-1].item() or 1.0
            self.edges = torch.linspace(0.0, hi, 101, device=flat.device)
            counts = torch.histc(flat, bins=100, min=0.0, max=hi)
            self.hist_density = counts / (self.n * (self.edges[1] - self.edges[0]))

    def cdf(self, t: torch.Tensor) -> torch.Tensor:
        """Exact fraction of scores <= t."""
        count = torch.searchsorted(self.sorted, t.detach().reshape(1), right=True)
        return (count.to(torch.float64) / self.n).to(t.dtype).reshape(t.shape)

    def density(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if self.method == "hist":
            width = self.edges[1] - self.edges[0]
            i = torch.clamp((t / width).long(), 0, 99)
            inside = (t >= 0) & (t <= self.edges[-1])
            return torch.where(inside, self.hist_density[i], torch.zeros_like(t))
        h = self.bandwidth
        z = (t - self.sample) / h
        dens = torch.exp(-0.5 * z * z)
        if self.reflect:
            zr = (t + self.sample) / h
            dens = dens + torch.exp(-0.5 * zr * zr)
        return dens.mean() / (h * _SQRT_2PI)


class _Bridge(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, dist):  # noqa: D401 - autograd signature
        ctx.dist = dist
        ctx.save_for_backward(t)
        return dist.cdf(t)

    @staticmethod
    def backward(ctx, grad):
        (t,) = ctx.saved_tensors
        return grad * ctx.dist.density(t).to(grad.dtype), None


def bridged_sparsity(t: torch.Tensor, dist: ScoreDistribution) -> torch.Tensor:
    """Sparsity F(t) of a layer: exact forward, density-estimated backward."""
    return _Bridge.apply(t, dist)
