"""The unit view of an allocation problem: per-unit scores and per-unit costs, pure.

A group of ``count`` units becomes one *unit layer* for the allocators: its scores are one
number per unit, its ``LayerSpec`` has the shape ``(count, unit_cost)``, so that the
layer's size ``numel`` is the group's whole cost in the budget's currency and every
allocator's parameter-weighted sparsity becomes the cost-weighted removed fraction.

A unit's score is the L2 norm of the per-weight scores of the slices its consumers read
(``||W[:, j]|| * ||x_j||`` for the wanda score: the activation-weighted norm of neuron j;
the columns of a head in the attention output projection; the input channel of the next
convolution). A group no scored layer reads is scored by its producers' rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..layers import LayerSpec, matches
from .groups import Member, UnitGroup, UnitMap


@dataclass(frozen=True)
class TensorCost:
    """One tensor that units slice: its shape, its cost per element under the budget and
    which group's units own which axis (``(axis, group, width)``)."""

    shape: tuple[int, ...]
    per_element: int
    axes: tuple[tuple[int, str, int], ...]

    def cost(self, kept: Mapping[str, int]) -> int:
        n = 1
        sizes = list(self.shape)
        for axis, group, width in self.axes:
            sizes[axis] = kept[group] * width
        for d in sizes:
            n *= d
        return n * self.per_element


@dataclass(frozen=True)
class CostModel:
    """The exact cost of the tensors units slice (each counted once, a weight whose rows
    and columns belong to two groups shrinks along both) plus the attention matmuls of the
    heads, for any number of kept units per group."""

    tensors: tuple[TensorCost, ...]
    per_unit: Mapping[str, int]  # cost linear in a group's kept units (attention matmuls)
    counts: Mapping[str, int]

    def cost(self, kept: Mapping[str, int]) -> int:
        total = sum(t.cost(kept) for t in self.tensors)
        return total + sum(self.per_unit.get(g, 0) * kept[g] for g in self.counts)

    @property
    def full(self) -> int:
        return self.cost(self.counts)

    def marginal(self, kept: Mapping[str, int], group: str) -> int:
        """What removing one more unit of ``group`` saves from the state ``kept``."""
        fewer = dict(kept, **{group: kept[group] - 1})
        return self.cost(kept) - self.cost(fewer)


def cost_model(
    units: UnitMap,
    shapes: Mapping[str, tuple[int, ...]],
    per_element: Mapping[str, int],
    attention: Mapping[str, int] | None = None,
) -> CostModel:
    """The :class:`CostModel` of ``units``: ``shapes`` and ``per_element`` cost of every
    member tensor (params: 1, buffers 0; flops: positions per sample for weights, else 0;
    bytes: element size), ``attention``: per-head cost of a head group's matmuls."""
    axes: dict[str, list[tuple[int, str, int]]] = {}
    for g in units.groups:
        for m in g.members:
            axes.setdefault(m.tensor, []).append((m.axis, g.name, m.width))
    tensors = tuple(
        TensorCost(tuple(shapes[t]), int(per_element[t]), tuple(a))
        for t, a in sorted(axes.items())
        if per_element[t]
    )
    return CostModel(tensors, dict(attention or {}), {g.name: g.count for g in units.groups})


@dataclass(frozen=True)
class UnitLayers:
    """The unit layers of a model: one ``LayerSpec`` and one score vector per group."""

    units: UnitMap
    layers: list[LayerSpec]
    scores: dict[str, torch.Tensor]
    costs: CostModel


def _slice_sq(score: torch.Tensor, member: Member, count: int) -> torch.Tensor:
    s = score.detach().float().movedim(member.axis, 0)
    return s.reshape(count, -1).pow(2).sum(1)


def unit_scores(group: UnitGroup, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One score per unit of ``group`` from per-weight ``scores`` keyed by module name."""
    weights = [m for m in group.members if m.leaf == "weight" and not m.buffer]
    readers = [m for m in weights if m.axis == 1 and m.module in scores]
    chosen = readers or [m for m in weights if m.axis == 0 and m.module in scores]
    total = torch.zeros(group.count)
    for m in chosen:
        total += _slice_sq(scores[m.module], m, group.count).cpu()
    return total.sqrt()


def _group_modules(group: UnitGroup) -> set[str]:
    return {m.module for m in group.members}


def unit_layers(
    units: UnitMap,
    scores: Mapping[str, torch.Tensor],
    costs: CostModel,
    *,
    exclude: Sequence[str] = (),
    keep_dense: Sequence[str] = (),
) -> UnitLayers:
    """The unit layers of ``units``, each of size (units, what its first unit saves). A
    group that touches a module matching ``exclude`` is not allocated (it stays whole), nor
    is one that touches no scored layer (outside the selection) or whose units cost nothing
    in the budget; one matching ``keep_dense`` is kept
    whole. Every other group keeps at least one unit. The cost model stays that of all
    groups: the target is a fraction of its full cost."""
    layers, kept_groups, unit_score = [], [], {}
    for g in units.groups:
        mods = _group_modules(g)
        cost = costs.marginal(costs.counts, g.name)
        unscored = not mods & set(scores)  # outside the layer selection
        if cost <= 0 or unscored or any(matches(n, p) for n in mods for p in exclude):
            continue
        dense = any(matches(n, p) for n in mods for p in keep_dense)
        hi = 0.0 if dense else (g.count - 1) / g.count
        layers.append(LayerSpec(g.name, f"units:{g.kind}", (g.count, cost), 0.0, hi))
        unit_score[g.name] = unit_scores(g, scores)
        kept_groups.append(g)
    return UnitLayers(UnitMap(tuple(kept_groups), units.blocked), layers, unit_score, costs)
