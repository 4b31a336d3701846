"""Allocation methods, found by name: ``get_allocator("fcpts", iters=200)``."""

from . import erk, fcpts, global_, owl, sparsegpt, uniform  # noqa: F401  (registers the methods)
from .base import Allocation, Allocator, LayerResult, Problem, Proposal, get_allocator

METHODS = tuple(sorted(Allocator.registry))

__all__ = [
    "Allocation",
    "Allocator",
    "LayerResult",
    "METHODS",
    "Problem",
    "Proposal",
    "get_allocator",
]
