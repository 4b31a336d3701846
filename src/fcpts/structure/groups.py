"""The unit groups of a model: what :func:`fcpts.structure.units.find_units` returns and
the tracer (:mod:`fcpts.structure.trace`) builds."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import UserError


@dataclass(frozen=True)
class Member:
    """A slice of one parameter (or buffer) that a group's units own along one axis."""

    tensor: str
    axis: int
    width: int = 1
    buffer: bool = False

    @property
    def module(self) -> str:
        return self.tensor.rpartition(".")[0]

    @property
    def leaf(self) -> str:
        return self.tensor.rpartition(".")[2]


@dataclass(frozen=True)
class UnitGroup:
    """``count`` units that share one layout of weight slices."""

    name: str
    kind: str  # "head", "neuron" or "channel"
    count: int
    members: tuple[Member, ...]
    attention: str | None = None  # for heads: the self-attention module
    head_size: int = 0


@dataclass(frozen=True)
class Blocked:
    """A layer whose outputs are not removable, and why."""

    name: str
    reason: str


@dataclass(frozen=True)
class UnitMap:
    groups: tuple[UnitGroup, ...]
    blocked: tuple[Blocked, ...] = field(default=())

    def group(self, name: str) -> UnitGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise UserError(
            f"unknown unit group {name!r}: choose one of {', '.join(g.name for g in self.groups)}"
        )
