"""Structured allocation end to end: a model in, a smaller dense model (units) or N:M masks out.

``shrink_to(model, target, budget=...)`` finds the model's removable units
(:func:`fcpts.structure.units.find_units`), costs one unit of each group in the budget's
currency (:mod:`fcpts.structure.cost`), lets the method allocate over the unit layers
(:mod:`fcpts.alloc.structured`), lands in whole units, optionally refits every consumer of
a removed unit by least squares (:mod:`fcpts.structure.refit`) and cuts the removed units
out (:mod:`fcpts.structure.shrink`). A method that reconstructed the kept weights jointly
(fcpts with joint reconstruction) keeps the refit only when it lowers the loss on the
method's held-out calibration batches: a layer-wise refit towards the dense layers'
outputs can undo the end-to-end reconstruction (MiniLM, flops 0.5, validation cosine 0.869
joint, 0.809 joint then refitted) or complete it (the digits CNN: top-1 0.900 vs 0.990).

The target is the fraction of the removable units' cost that leaves (all of MiniLM's
multiply-accumulates are in its heads and FFN neurons; its embeddings are not removable,
so under ``params`` the whole model shrinks by less: ``cost`` says by how much).

``sparsify_nm(model, target, n, m)`` is the N:M structure (see :mod:`fcpts.alloc.structured`).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .alloc.base import Allocation, LayerResult
from .alloc.phases import split_batches
from .alloc.reconstruction import teacher_outputs
from .alloc.structured import UnitAllocation, UnitView, allocate_units, nm_allocation
from .core import LayerSelection, build_problem
from .errors import UserError
from .layers import find_prunable
from .structure.budget import CostModel, unit_layers
from .structure.cost import Cost, check_budget, model_cost, profile, units_cost_model
from .structure.groups import UnitMap
from .structure.refit import refit_consumers
from .structure.saved import units_section
from .structure.shrink import shrink
from .structure.units import find_units
from .tasks import Task, to_device


@dataclass
class Shrunk:
    """The smaller dense model and the figures that describe how it was made."""

    model: nn.Module
    units: UnitMap
    allocation: UnitAllocation
    budget: str
    method: str
    score: str
    settings: dict[str, Any]
    refitted: list[str]
    reconstruction: str  # "joint", "joint + least-squares", "least-squares" or "none"
    dense_cost: Cost
    cost: Cost
    seconds: float = 0.0

    def section(self) -> dict[str, Any]:
        """The manifest's description of the structured allocation."""
        a = self.allocation
        groups = []
        for g in self.units.groups:
            k = a.keep[g.name]
            groups.append({"name": g.name, "kind": g.kind, "units": g.count, "kept": int(k.sum())})
        whole = {
            b: {"dense": self.dense_cost.of(b), "shrunk": self.cost.of(b)}
            for b in ("params", "flops", "bytes")
        }
        return {
            "structure": "units",
            "budget": self.budget,
            "target": a.target,
            "achieved": a.achieved,
            "removed_cost": a.removed,
            "removable_cost": a.total,
            "granularity": a.granularity,
            "unit_multiple": a.multiple,
            "off_by": abs(a.achieved - a.target),
            "reconstruction": self.reconstruction,
            "refitted": self.refitted,
            "groups": groups,
            "whole_model": whole,
        }

    def manifest_units(self) -> dict[str, Any]:
        return units_section(self.units, self.allocation.keep, self.model)

    def as_allocation(self, target: float) -> Allocation:
        """The shrunk model's own Linear/Conv layers as an allocation (their shapes, no
        masks): what the manifest lists per layer, counted in the written weights."""
        layers = []
        for layer in find_prunable(self.model):
            w = self.model.get_submodule(layer.name).weight
            zeros = int((w == 0).sum())
            layers.append(
                LayerResult(layer.name, layer.shape, layer.numel, zeros, float("nan"), zeros)
            )
        return Allocation(
            method=self.method,
            score=self.score,
            target=target,
            layers=layers,
            masks={},
            settings=self.settings,
            history=self.allocation.proposal.history,
            seconds=self.seconds,
            weights=self.allocation.proposal.weights,
        )


def _example(task: Task, batches: Sequence[Any]) -> tuple[tuple, dict]:
    return task.split(batches[0])


def unit_costs(
    model: nn.Module, units: UnitMap, budget: str, args: tuple, kwargs: Mapping[str, Any]
) -> CostModel:
    """The cost model of ``units`` under ``budget`` at the example call's shape."""
    prof = profile(model, args, kwargs) if budget == "flops" else None
    return units_cost_model(model, units, budget, prof)


@torch.no_grad()
def _with_weights(model: nn.Module, allocation: UnitAllocation) -> nn.Module:
    """A copy of ``model`` carrying a joint reconstruction's weights and parameters."""
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    p = allocation.proposal
    for name, value in {**(p.params or {}), **(p.weights or {})}.items():
        params[name].copy_(value.to(params[name].device, params[name].dtype))
    return out


@torch.no_grad()
def _held_loss(small: nn.Module, task: Task, held: Sequence[Any], wanted: Sequence[Any]) -> float:
    """The task's mean loss of ``small`` on ``held`` against the dense targets ``wanted``
    (:func:`fcpts.alloc.reconstruction.teacher_outputs`)."""
    total = 0.0
    for batch, (want, _) in zip(held, wanted, strict=True):
        total += float(task.loss(task.target(task.run(small, batch), batch), want, batch))
    return total / max(1, len(held))


def _reconstruct(
    model: nn.Module,
    allocation: UnitAllocation,
    units: UnitMap,
    task: Task,
    batches: list[Any],
    refit: bool,
    holdout: float,
) -> tuple[nn.Module, list[str], str]:
    """The shrunk model, the refitted consumers and how it was reconstructed. Without a
    joint reconstruction the consumers are refitted (``refit``); with one, the refit is
    kept only when it lowers the loss on the method's held-out calibration batches."""
    model = model.cpu().eval()
    full = _with_weights(model, allocation)
    joint = bool(allocation.proposal.weights)
    if not refit:
        return shrink(full, units, allocation.keep).eval(), [], "joint" if joint else "none"
    if not joint:
        refitted = refit_consumers(full, model, units, allocation.keep, batches, task.run)
        return (
            shrink(full, units, allocation.keep).eval(),
            refitted,
            ("least-squares" if refitted else "none"),
        )
    kept = shrink(full, units, allocation.keep).eval()
    train, held = split_batches(batches, holdout)  # the refit is judged on unseen batches
    refitted = refit_consumers(full, model, units, allocation.keep, train, task.run)
    small = shrink(full, units, allocation.keep).eval()
    wanted = teacher_outputs(model, task, held, {})
    if _held_loss(kept, task, held, wanted) <= _held_loss(small, task, held, wanted):
        return kept, [], "joint"
    return small, refitted, "joint + least-squares"


def shrink_to(
    model: nn.Module,
    target: float,
    *,
    budget: str = "params",
    method: str = "fcpts",
    score: str = "auto",
    task: Task | None = None,
    batches: Sequence[Any] | None = None,
    selection: LayerSelection | None = None,
    settings: Mapping[str, Any] | None = None,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "auto",
    refit: bool = True,
    unit_multiple: int = 8,
    callback: Any = None,
    progress: bool = False,
) -> Shrunk:
    """The smaller dense model that removes ``target`` of the removable units' cost;
    ``unit_multiple`` > 1 keeps each group's width a multiple of it (groups of at least
    twice as many units; 8 by default, widths the CPU kernels run fast at); 1 removes any
    number of units."""
    check_budget(budget)
    if task is None or not batches:
        raise UserError("--structure units needs calibration data (the example input shape)")
    start = time.perf_counter()
    model = model.eval()
    args, kwargs = _example(task, batches)
    found = find_units(model, args, kwargs)
    if not found.groups:
        reasons = "; ".join(f"{b.name}: {b.reason}" for b in found.blocked[:3])
        raise UserError(
            f"the model has no removable unit ({reasons}): use --structure 2:4 or unstructured"
        )
    selection = selection or LayerSelection()
    allocator, problem = build_problem(
        model,
        target,
        method=method,
        score=score,
        task=task,
        batches=batches,
        selection=dataclasses.replace(selection, keep_dense=(), bounds={}),
        settings=settings,
        input_norms=input_norms,
        device=device,
        callback=callback,
        progress=progress,
    )
    view = unit_layers(
        found,
        problem.scores,
        unit_costs(model, found, budget, args, kwargs),
        exclude=selection.exclude,
        keep_dense=selection.keep_dense,
    )
    if not view.layers:
        raise UserError("every unit group is excluded or costs nothing under this budget")
    problem = dataclasses.replace(
        problem,
        layers=view.layers,
        scores=view.scores,
        weights={},
        view=UnitView(view.units),
    )
    allocation = allocate_units(allocator, problem, view.costs, unit_multiple)
    small, refitted, reconstruction = _reconstruct(
        model,
        allocation,
        view.units,
        task,
        [to_device(b, "cpu") for b in batches],
        refit,
        getattr(allocator.config, "holdout", 0.0),
    )
    shrunk = Shrunk(
        model=small,
        units=view.units,
        allocation=allocation,
        budget=budget,
        method=allocator.name,
        score=problem.score_kind,
        settings=dict(dataclasses.asdict(allocator.config), device=str(problem.device)),
        refitted=refitted,
        reconstruction=reconstruction,
        dense_cost=model_cost(model, args, kwargs),
        cost=model_cost(small, args, kwargs),
    )
    shrunk.seconds = time.perf_counter() - start
    return shrunk


def sparsify_nm(
    model: nn.Module, target: float, n: int, m: int, **kwargs: Any
) -> tuple[Allocation, list[str]]:
    """N:M masks where the method's own allocation at ``target`` prunes most (see
    :func:`fcpts.alloc.structured.nm_layers`); the layers chosen. ``kwargs`` as
    :func:`fcpts.core.sparsify`. A joint reconstruction made for the unstructured masks
    is not kept."""
    start = time.perf_counter()
    allocator, problem = build_problem(model, target, **kwargs)
    base = allocator.allocate(problem)
    masks, chosen = nm_allocation(base, problem, n, m)
    layers = [
        LayerResult(
            layer.name,
            layer.shape,
            layer.numel,
            int((~masks[layer.name]).sum()),
            float("nan"),
            int(((problem.weights[layer.name] == 0) & ~masks[layer.name]).sum()),
        )
        for layer in problem.layers
    ]
    allocation = Allocation(
        method=base.method,
        score=base.score,
        target=base.target,
        layers=layers,
        masks=masks,
        settings=dict(base.settings, device=str(problem.device)),
        history=base.history,
    )
    allocation.seconds = time.perf_counter() - start
    return allocation, chosen
