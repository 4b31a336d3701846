"""Uniform allocation: every layer at the global target (bounds permitting)."""

from __future__ import annotations

from .base import Allocator, Problem, Proposal


class Uniform(Allocator):
    name = "uniform"

    def propose(self, problem: Problem) -> Proposal:
        return Proposal(sparsities={layer.name: problem.target for layer in problem.layers})
