"""Find the prunable layers of any ``nn.Module``.

A prunable layer is a module with a dense ``weight`` that fcpts may zero: ``nn.Linear``,
``nn.Conv1d/2d/3d`` and Hugging Face's ``Conv1D`` (GPT-2 style, weight stored as
``(in, out)``). Embeddings and normalisation layers are never prunable.

Name patterns are shell globs (``encoder.*.query``) matched against the module name, or
regular expressions when written ``re:<expr>``.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class LayerSpec:
    """One prunable weight: where it lives, its size and the sparsity bounds it accepts."""

    name: str
    kind: str
    shape: tuple[int, ...]
    min_sparsity: float = 0.0
    max_sparsity: float = 1.0
    in_axis: int = 1
    groups: int = 1

    @property
    def param_name(self) -> str:
        return f"{self.name}.weight" if self.name else "weight"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def keep_dense(self) -> bool:
        return self.max_sparsity == 0.0

    def min_zeros(self) -> int:
        """Fewest zeros the bounds allow (ceil so that the bound holds)."""
        return min(self.numel, math.ceil(self.min_sparsity * self.numel - 1e-9))

    def max_zeros(self) -> int:
        """Most zeros the bounds allow (floor so that the bound holds)."""
        return max(0, math.floor(self.max_sparsity * self.numel + 1e-9))


def _kind_of(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, input-channel axis of the weight, groups), or None if not prunable."""
    if isinstance(module, nn.Linear):
        return "linear", 1, 1
    if isinstance(module, _CONV_TYPES):
        return type(module).__name__.lower(), 1, module.groups
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "hf_conv1d", 0, 1
    return None


def matches(name: str, pattern: str) -> bool:
    """True when ``name`` matches a glob, or a regex written ``re:<expr>``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_patterns(what: str, patterns: Iterable[str], names: Sequence[str]) -> None:
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise UserError(f"{what} pattern {pattern!r} is not a valid regex: {exc}") from None
        if not any(matches(n, pattern) for n in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise UserError(
                f"{what} pattern {pattern!r} matches no prunable layer; layer names look like: {shown}"
            )


def _check_bound(what: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise UserError(f"{what} must be within [0, 1], got {value}")
    return value


def find_prunable(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    keep_dense: Sequence[str] = (),
    bounds: Mapping[str, tuple[float, float]] | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 1.0,
) -> list[LayerSpec]:
    """List the prunable layers of ``model`` in module order.

    ``include`` keeps only matching layers, ``exclude`` drops them (they don't count
    towards the global target). ``keep_dense`` layers count towards the target but stay
    dense. ``bounds`` maps a pattern to ``(min_sparsity, max_sparsity)``; the first
    matching pattern wins; unmatched layers get the global ``min_sparsity/max_sparsity``.
    """
    if not isinstance(model, nn.Module):
        raise UserError(f"expected a torch.nn.Module, got {type(model).__name__}")
    min_sparsity = _check_bound("min_sparsity", min_sparsity)
    max_sparsity = _check_bound("max_sparsity", max_sparsity)
    if min_sparsity > max_sparsity:
        raise UserError(f"min_sparsity {min_sparsity} is above max_sparsity {max_sparsity}")
    bounds = dict(bounds or {})
    for pattern, (lo, hi) in bounds.items():
        _check_bound(f"min sparsity for {pattern!r}", lo)
        _check_bound(f"max sparsity for {pattern!r}", hi)
        if lo > hi:
            raise UserError(f"bounds for {pattern!r}: min {lo} is above max {hi}")

    candidates: list[tuple[str, nn.Module, tuple[str, int, int]]] = []
    for name, module in model.named_modules():
        kind = _kind_of(module)
        weight = getattr(module, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor):
            continue
        candidates.append((name, module, kind))
    if not candidates:
        raise UserError(
            f"{type(model).__name__} has no prunable layer (Linear, Conv1d/2d/3d or "
            "transformers' Conv1D); fcpts prunes the weights of those layers only"
        )
    all_names = [c[0] for c in candidates]
    _check_patterns("include", include or (), all_names)
    _check_patterns("exclude", exclude, all_names)
    _check_patterns("keep-dense", keep_dense, all_names)
    _check_patterns("bounds", bounds.keys(), all_names)

    layers: list[LayerSpec] = []
    for name, module, (kind, in_axis, groups) in candidates:
        if include and not any(matches(name, p) for p in include):
            continue
        if any(matches(name, p) for p in exclude):
            continue
        weight = module.weight
        if not torch.isfinite(weight).all():
            raise UserError(
                f"layer {name!r} has NaN or infinite weights: fix the checkpoint before pruning"
            )
        lo, hi = min_sparsity, max_sparsity
        for pattern, (plo, phi) in bounds.items():
            if matches(name, pattern):
                lo, hi = float(plo), float(phi)
                break
        if any(matches(name, p) for p in keep_dense):
            lo, hi = 0.0, 0.0
        layers.append(
            LayerSpec(
                name=name,
                kind=kind,
                shape=tuple(weight.shape),
                min_sparsity=lo,
                max_sparsity=hi,
                in_axis=in_axis,
                groups=groups,
            )
        )
    if not layers:
        raise UserError("the include/exclude patterns leave no prunable layer: loosen them")
    return layers


def get_weight(model: nn.Module, layer: LayerSpec) -> torch.Tensor:
    return model.get_submodule(layer.name).weight
