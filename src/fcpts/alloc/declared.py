"""The declared settings of every registered method (see :mod:`fcpts.settings`), and the
names they go by outside the library: flag, ``--config`` key and MLflow param are the same
word (``lam_tolerance``, ``owl_m``), unique across methods."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..settings import Declared, declared
from .base import Allocator


def method_settings(visible_only: bool = True) -> list[tuple[str, Declared]]:
    """(method, setting) for every setting of every registered method, methods sorted by
    name, settings in declaration order; ``visible_only`` drops those hidden from the CLI
    (fcpts's ``seed``, which the steps' ``--seed`` fills)."""
    out = []
    for method in sorted(Allocator.registry):
        for setting in declared(Allocator.registry[method].Config):
            if setting.opt.cli or not visible_only:
                out.append((method, setting))
    return out


def param_values(method: str | None, settings: Mapping[str, Any]) -> dict[str, Any]:
    """Every declared setting by its outside name: the value ``settings`` gives for
    ``method``'s own settings, None for the other methods' (so every run has the same
    param names, the ones that do not apply left empty)."""
    return {
        setting.dest: settings.get(setting.name) if owner == method else None
        for owner, setting in method_settings()
    }
