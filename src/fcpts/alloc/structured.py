"""Allocation at a structure coarser than single weights: whole units, or N:M groups.

``units``: every allocator proposes on the unit layers of :mod:`fcpts.structure.budget`
(one score per unit, one layer per unit group whose size is its cost in the budget's
currency), so a proposal's thresholds or sparsities act on unit scores and the global
constraint is the cost-weighted removed fraction. Landing then removes the units with the
smallest landing keys (the same keys as :mod:`fcpts.landing`) until the removed cost is as
close to ``target x total`` as whole units allow: within half the dearest unit's cost.
The learned method masks units through :class:`UnitView` (a unit mask zeroes every slice
the unit owns, with the straight-through gradient reaching the unit's threshold).

``N:M``: at most N nonzeros in every M consecutive weights along the input axis. A layer
is either N:M (sparsity exactly 1 - N/M) or dense; which layers are N:M is decided by the
method's own allocation at the target: the layers it prunes most become N:M first, until
the zeros are as close to the target as whole layers allow (all eligible layers when the
target is 1 - N/M or above).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .. import landing
from ..errors import UserError
from ..layers import LayerSpec
from ..structure.budget import CostModel
from ..structure.groups import UnitMap
from .base import Allocation, Allocator, Problem, Proposal

STRUCTURES = ("unstructured", "units", "N:M")


def parse_structure(structure: str) -> tuple[str, int, int]:
    """("unstructured" | "units", 0, 0) or ("nm", N, M) from "unstructured", "units", "2:4"."""
    s = str(structure).strip()
    if s in ("unstructured", "units"):
        return s, 0, 0
    found = re.fullmatch(r"(\d+):(\d+)", s)
    if found:
        n, m = int(found.group(1)), int(found.group(2))
        if 0 < n < m:
            return "nm", n, m
    raise UserError(
        f"unknown structure {structure!r}: choose unstructured, units, or N:M with 0 < N < M "
        "(e.g. 2:4)"
    )


@dataclass(frozen=True)
class UnitView:
    """How unit masks mask a model: each unit layer's mask zeroes the slices its units own."""

    units: UnitMap

    def params(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        """The parameters any unit owns a slice of, by parameter name."""
        named = dict(model.named_parameters())
        names = {m.tensor for g in self.units.groups for m in g.members if not m.buffer}
        return {n: named[n] for n in sorted(names)}

    def overrides(
        self,
        params: Mapping[str, torch.Tensor],
        learn: Sequence[LayerSpec],
        masks: Sequence[torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for layer, mask in zip(learn, masks, strict=True):
            group = self.units.group(layer.name)
            for m in group.members:
                if m.buffer:
                    continue
                base = out.get(m.tensor, params[m.tensor])
                per_index = mask.repeat_interleave(m.width)
                view = [1] * base.dim()
                view[m.axis] = per_index.numel()
                out[m.tensor] = base * per_index.view(view).to(base.dtype)
        return out


@dataclass
class UnitAllocation:
    """Kept units (True = kept) per group, the proposal behind them and the cost figures."""

    keep: dict[str, torch.Tensor]
    proposal: Proposal
    target: float
    total: int
    removed: int
    granularity: float  # the dearest step's share of the total (a unit, or a block)
    multiple: int = 1  # units per removal step in groups of at least twice as many

    @property
    def achieved(self) -> float:
        return self.removed / self.total


def _steps(count: int, lo: int, hi: int, multiple: int) -> list[tuple[int, int]]:
    """(first unit, units) of each removal step of a group: one unit at a time, or with
    ``multiple`` > 1 whole blocks that leave a multiple of it kept (a group of fewer
    units than ``multiple`` goes one unit at a time)."""
    if multiple <= 1 or count < 2 * multiple:
        return [(r, 1) for r in range(lo, hi)]
    steps, r = [], lo
    size = (count - r) % multiple or multiple
    while r + size <= hi and count - r - size >= multiple:
        steps.append((r, size))
        r += size
        size = multiple
    return steps


def land_units(
    allocator: Allocator,
    problem: Problem,
    proposal: Proposal,
    costs: CostModel,
    multiple: int = 1,
) -> tuple[dict[str, torch.Tensor], int]:
    """Keep masks whose removed cost (exact, from ``costs``) lands on ``target x full
    cost`` to within one step: units (or blocks of ``multiple`` units) are removed in
    landing-key order, a step that would overshoot by more than it leaves short is skipped
    (later, cheaper ones may still fit). Returns the masks and the removed cost."""
    ordered = landing.sorted_scores(problem.scores)
    values = {name: v for name, (v, _) in ordered.items()}
    keys = allocator.keys(proposal, values)
    want = problem.target * costs.full
    kept = dict(costs.counts)
    entries = []
    for layer in problem.layers:
        count = layer.shape[0]
        lo = math.ceil(layer.min_sparsity * count - 1e-9)
        hi = math.floor(layer.max_sparsity * count + 1e-9)
        kept[layer.name] = count - lo
        for first, size in _steps(count, lo, hi, multiple):
            entries.append((float(keys[layer.name][first + size - 1]), layer.name, size))
    entries.sort(key=lambda e: e[0])
    removed = costs.full - costs.cost(kept)
    skipped: set[str] = set()  # a group whose step was skipped takes no later step
    for _key, name, size in entries:  # a step that would overshoot is skipped unless closer
        if name in skipped:
            continue
        fewer = dict(kept, **{name: kept[name] - size})
        unit = costs.cost(kept) - costs.cost(fewer)
        if removed + unit > want and removed + unit - want >= want - removed:
            skipped.add(name)
            continue
        removed += unit
        kept = fewer
        if removed >= want:
            break
    keep = {}
    for layer in problem.layers:
        _, order = ordered[layer.name]
        k = torch.ones(layer.shape[0], dtype=torch.bool)
        k[order[: layer.shape[0] - kept[layer.name]].cpu()] = False
        keep[layer.name] = k
    return keep, removed


def allocate_units(
    allocator: Allocator, problem: Problem, costs: CostModel, multiple: int = 1
) -> UnitAllocation:
    """Propose on the unit layers of ``problem`` and land in whole units (or blocks of
    ``multiple``)."""
    if allocator.name == "sparsegpt":
        raise UserError(
            "the sparsegpt method solves for single weights: with --structure units use "
            "fcpts, uniform, global, erk or owl"
        )
    target = landing.check_target(problem.target)
    proposal = allocator.propose(problem)
    keep, removed = land_units(allocator, problem, proposal, costs, multiple)
    dearest = max(layer.shape[1] for layer in problem.layers) * max(1, multiple)
    return UnitAllocation(
        keep, proposal, target, costs.full, removed, dearest / costs.full, max(1, multiple)
    )


def nm_mask(scores: torch.Tensor, n: int, m: int, in_axis: int = 1) -> torch.Tensor:
    """Keep the N highest scores of every M consecutive entries along ``in_axis``."""
    s = scores.detach().float().movedim(in_axis, -1)
    shape = s.shape
    groups = s.reshape(-1, m)
    top = groups.topk(n, dim=1, sorted=False).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, top, True)
    return keep.reshape(shape).movedim(-1, in_axis)


def nm_eligible(layer: LayerSpec, m: int) -> bool:
    return not layer.keep_dense and layer.shape[layer.in_axis] % m == 0


def nm_layers(allocation: Allocation, layers: Sequence[LayerSpec], n: int, m: int) -> list[str]:
    """The layers that become N:M: highest allocated sparsity first, each one that brings
    the zeros closer to the target's (so they land within half a layer's N:M zeros)."""
    by_name = {layer.name: layer for layer in layers}
    want = allocation.target * sum(layer.numel for layer in layers)
    ranked = sorted(
        (r for r in allocation.layers if nm_eligible(by_name[r.name], m)),
        key=lambda r: -r.sparsity,
    )
    chosen, zeros = [], 0.0
    for r in ranked:
        add = r.numel * (1 - n / m)
        if abs(zeros + add - want) >= abs(zeros - want):
            continue  # overshoots by more than it leaves short: a smaller layer may fit
        chosen.append(r.name)
        zeros += add
    return chosen


def nm_allocation(
    allocation: Allocation, problem: Problem, n: int, m: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """N:M masks (dense elsewhere) of the layers :func:`nm_layers` picks."""
    chosen = set(nm_layers(allocation, problem.layers, n, m))
    if not chosen:
        raise UserError(
            f"no prunable layer takes {n}:{m}: the input width of every layer must be a "
            f"multiple of {m} (and the layer not kept dense)"
        )
    masks = {}
    for layer in problem.layers:
        if layer.name in chosen:
            masks[layer.name] = nm_mask(problem.scores[layer.name], n, m, layer.in_axis)
        else:
            masks[layer.name] = torch.ones(layer.shape, dtype=torch.bool)
    return masks, sorted(chosen)
