"""Global allocation: one score threshold shared by all layers (global magnitude pruning)."""

from __future__ import annotations

from .base import Allocator, Problem, Proposal


class Global(Allocator):
    name = "global"

    def propose(self, problem: Problem) -> Proposal:
        # A threshold of 1 for every layer turns landing's ratio keys into the raw scores.
        return Proposal(thresholds={layer.name: 1.0 for layer in problem.layers})
