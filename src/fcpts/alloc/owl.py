"""Outlier-weighted layerwise sparsity (OWL, Yin et al., 2024).

A layer's outlier ratio D_l is the fraction of its scores above M times their mean.
Ratios are rescaled to [0, 2*lambda], centred on the global density 1 - S*, and layers
with more outliers are kept denser. Ratios outside [0, 1] (they happen on small models)
are clipped, and landing redistributes what clipping moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from ..errors import UserError
from ..settings import Opt
from .base import Allocator, Problem, Proposal


class OWL(Allocator):
    name = "owl"

    @dataclass(frozen=True)
    class Config:
        m: Annotated[
            float,
            Opt(
                "outlier factor: a score above m x the layer's mean score is an outlier",
                flag="owl-m",
            ),
        ] = 5.0
        lam: Annotated[
            float,
            Opt("half-width of the sparsity spread around the target", flag="owl-lam"),
        ] = 0.08

        def __post_init__(self) -> None:
            if self.m <= 0:
                raise UserError(f"owl setting m must be > 0 (outlier factor, e.g. 5), got {self.m}")
            if not 0 <= self.lam < 0.5:
                raise UserError(f"owl setting lam must be in [0, 0.5) (e.g. 0.08), got {self.lam}")

    def propose(self, problem: Problem) -> Proposal:
        ratios = {}
        for layer in problem.layers:
            s = problem.scores[layer.name].float()
            ratios[layer.name] = (s > self.config.m * s.mean()).float().mean().item()
        lo, hi = min(ratios.values()), max(ratios.values())
        span = hi - lo
        scaled = {
            n: ((r - lo) / span if span > 0 else 0.0) * 2 * self.config.lam
            for n, r in ratios.items()
        }
        mean = sum(scaled.values()) / len(scaled)
        sparsities = {
            n: min(1.0, max(0.0, 1.0 - (v - mean + (1.0 - problem.target))))
            for n, v in scaled.items()
        }
        return Proposal(sparsities=sparsities)
