"""The allocator interface, its registry, and the result every allocator returns.

An allocator reads a :class:`Problem` (the prunable layers, their weights and scores, the
global target, and for learned methods the model, task and calibration batches) and
proposes either per-layer sparsities or per-layer score thresholds. The base class lands
every proposal exactly on the target (see :mod:`fcpts.landing`), so no method can drift.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import landing
from ..errors import UserError
from ..layers import LayerSpec
from ..settings import check_values

Callback = Callable[[int, dict[str, float]], None]


@dataclass
class Problem:
    """Everything an allocator may read. Scores and weights are keyed by layer name."""

    layers: list[LayerSpec]
    weights: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    target: float
    score_kind: str = "magnitude"
    model: nn.Module | None = None
    task: Any = None
    batches: Sequence[Any] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    callback: Callback | None = None
    progress: bool = False
    checkpoint: Any = None  # a fcpts.checkpoint.Checkpointer for iterative methods
    view: Any = None  # units: a fcpts.alloc.structured.UnitView (layers are unit groups)

    @property
    def total(self) -> int:
        return sum(layer.numel for layer in self.layers)


@dataclass
class Proposal:
    """What an allocator proposes; exactly one of sparsities/thresholds is set.

    ``masks`` (True = keep), when set, are used as they are instead of masks built from
    the scores; each must hold exactly the count that landing gives its layer.
    """

    sparsities: dict[str, float] | None = None
    thresholds: dict[str, float] | None = None
    masks: dict[str, torch.Tensor] | None = None
    weights: dict[str, torch.Tensor] | None = None
    params: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LayerResult:
    name: str
    shape: tuple[int, ...]
    numel: int
    zeros: int
    threshold: float
    existing: int = 0  # weights that were zero already (all among the zeros)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel

    @property
    def empty(self) -> bool:
        """Pruned to 100%: the layer passes nothing on."""
        return self.zeros == self.numel


@dataclass
class Allocation:
    """Masks (True = keep) and the figures that describe them."""

    method: str
    score: str
    target: float
    layers: list[LayerResult]
    masks: dict[str, torch.Tensor]
    settings: dict[str, Any]
    weights: dict[str, torch.Tensor] | None = None
    params: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def prunable(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def achieved(self) -> float:
        return self.zeros / self.prunable

    def sparsities(self) -> dict[str, float]:
        return {layer.name: layer.sparsity for layer in self.layers}

    @property
    def empty_layers(self) -> list[str]:
        """The layers pruned to 100%."""
        return [layer.name for layer in self.layers if layer.empty]


class Allocator(ABC):
    """Base of every allocation method. Subclasses set ``name`` and ``Config``."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Allocator]]] = {}

    @dataclass(frozen=True)
    class Config:
        def __post_init__(self) -> None:  # subclasses validate here
            pass

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Allocator.registry[cls.name] = cls

    def __init__(self, **settings: Any) -> None:
        known = {f.name for f in dataclasses.fields(self.Config)}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise UserError(
                f"allocator {self.name!r} has no setting {unknown[0]!r}; "
                f"its settings are: {', '.join(sorted(known)) or '(none)'}"
            )
        settings = check_values(self.Config, settings, f"{self.name} setting")
        try:
            self.config = self.Config(**settings)
        except TypeError as exc:
            raise UserError(f"allocator {self.name!r}: {exc}") from None

    @abstractmethod
    def propose(self, problem: Problem) -> Proposal:
        """Per-layer sparsities or thresholds for ``problem.target``."""

    def allocate(self, problem: Problem) -> Allocation:
        """Propose, then land exactly on round(target x N) zeros within the bounds.

        Weights that are zero already, in the weights the allocation writes (the
        proposal's reconstructed ones, or the problem's), count among the zeros.
        """
        target = landing.check_target(problem.target)
        landing.check_feasible(target, problem.layers, landing.zero_counts(problem.weights))
        start = time.perf_counter()
        proposal = self.propose(problem)
        allocation = self.land(problem, proposal, target)
        allocation.seconds = time.perf_counter() - start
        return allocation

    def land(self, problem: Problem, proposal: Proposal, target: float) -> Allocation:
        """The masks of ``proposal`` landed exactly, and the figures that describe them."""
        zeros = {name: w == 0 for name, w in written_weights(problem, proposal).items()}
        if proposal.masks is not None:  # weights pruned by the proposal are not "existing"
            zeros = {
                name: (problem.weights[name] == 0) | (z & proposal.masks[name].to(z.device))
                for name, z in zeros.items()
            }
        existing = {name: int(z.sum()) for name, z in zeros.items()}
        k = landing.check_feasible(target, problem.layers, existing)
        ordered = landing.sorted_scores(problem.scores, zeros)
        values = {name: v for name, (v, _) in ordered.items()}
        counts = landing.land_counts(self.keys(proposal, values), problem.layers, k, existing)
        if proposal.masks is not None:
            masks = _checked_masks(self.name, proposal.masks, counts, problem.layers)
        else:
            masks = landing.masks_from_counts(
                {name: o for name, (_, o) in ordered.items()},
                counts,
                {layer.name: layer.shape for layer in problem.layers},
            )
        layers = []
        for layer in problem.layers:
            c = counts[layer.name]
            v = values[layer.name]
            # proposed masks are not cut at a score threshold
            threshold = float(v[c - 1]) if c > 0 and proposal.masks is None else float("nan")
            layers.append(
                LayerResult(
                    layer.name, layer.shape, layer.numel, c, threshold, existing[layer.name]
                )
            )
        return Allocation(
            method=self.name,
            score=problem.score_kind,
            target=target,
            layers=layers,
            masks=masks,
            settings=dataclasses.asdict(self.config),
            weights=proposal.weights,
            params=proposal.params,
            history=proposal.history,
        )

    def keys(self, proposal: Proposal, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Landing keys of each layer's sorted scores, from what the proposal set."""
        if proposal.thresholds is not None:
            return landing.keys_from_thresholds(values, proposal.thresholds)
        if proposal.sparsities is not None:
            return landing.keys_from_sparsities(values, proposal.sparsities)
        raise RuntimeError(f"allocator {self.name!r} proposed nothing")


def written_weights(problem: Problem, proposal: Proposal) -> dict[str, torch.Tensor]:
    """The weights the allocation will write before masking: the proposal's reconstructed
    ones in the model's dtype where it has them, else the problem's."""
    out = {}
    for layer in problem.layers:
        w = problem.weights[layer.name]
        if proposal.weights and layer.name in proposal.weights:
            w = proposal.weights[layer.name].detach().to(w.device, w.dtype)
        out[layer.name] = w
    return out


def _checked_masks(
    method: str,
    masks: dict[str, torch.Tensor],
    counts: dict[str, int],
    layers: Sequence[LayerSpec],
) -> dict[str, torch.Tensor]:
    """Proposed keep-masks, each checked against its layer's shape, landed count and bounds."""
    for layer in layers:
        mask = masks.get(layer.name)
        if mask is None or tuple(mask.shape) != layer.shape:
            raise RuntimeError(
                f"allocator {method!r} proposed no mask of shape {layer.shape} for {layer.name!r}"
            )
        zeros = int((~mask.bool()).sum())
        if zeros != counts[layer.name] or not layer.min_zeros() <= zeros <= layer.max_zeros():
            raise RuntimeError(
                f"allocator {method!r} proposed {zeros} zeros for {layer.name!r}; "
                f"landing gives it {counts[layer.name]}"
            )
    return {layer.name: masks[layer.name].bool() for layer in layers}


def get_allocator(name: str, **settings: Any) -> Allocator:
    """An allocator by its registry name, e.g. ``get_allocator("fcpts", iters=100)``."""
    try:
        cls = Allocator.registry[name]
    except KeyError:
        raise UserError(
            f"unknown method {name!r}: choose one of {', '.join(sorted(Allocator.registry))}"
        ) from None
    return cls(**settings)
