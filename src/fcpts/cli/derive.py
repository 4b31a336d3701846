"""Command-line options derived from declared settings (:mod:`fcpts.settings`).

Every setting of every allocation method gets a flag (``--weight-lr``, ``--owl-m``, ...)
from its declaration: type, choices, help text and default come from the ``Config``
dataclass of the method, so a new setting appears here, in ``--config`` files, in the
sweep's search space, in MLflow's params and in the README without being retyped.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any

from ..errors import UserError
from ..settings import Declared, declared


def argparse_kwargs(
    setting: Declared, required: bool = False, shown: str | None = None
) -> dict[str, Any]:
    """The ``add_argument`` keywords of one declared setting (default None: "not given",
    so a ``--config`` file can fill it); ``required`` only changes the help text (the
    command checks it, after the config file)."""
    help_text = " ".join(setting.opt.help.split())
    if required:
        note = " (required)"
    elif shown is not None:
        note = f" (default: {shown})"
    elif "default:" in help_text:
        note = ""
    else:
        note = f" (default: {setting.default_text()})"
    kwargs: dict[str, Any] = {
        "dest": setting.dest,
        "default": None,
        "help": f"{help_text}{note}".replace("%", "%%"),  # argparse %-formats help strings
    }
    if setting.type is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif setting.type in (tuple, dict):
        kwargs["action"] = "append"
        kwargs["metavar"] = setting.opt.metavar or "VALUE"
    else:
        kwargs["type"] = setting.type if setting.type in (int, float, str) else str
        kwargs["metavar"] = setting.opt.metavar or kwargs["type"].__name__.upper()
        if setting.opt.choices:
            kwargs["choices"] = setting.opt.choices
            kwargs.pop("metavar")
    return kwargs


def add_group(
    parser: argparse.ArgumentParser,
    group: type,
    title: str,
    description: str | None = None,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    required: Iterable[str] = (),
    aliases: dict[str, tuple[str, ...]] | None = None,
    shown_defaults: dict[str, str] | None = None,
    helps: dict[str, str] | None = None,
) -> Any:
    """An argument group with a flag for each declared field of ``group`` (``only`` those
    named, by dest, in that order; ``skip`` some); ``aliases`` adds further flag names,
    ``shown_defaults`` replaces the default a help text shows where this command differs,
    ``helps`` the help text where the option means something narrower here."""
    settings = {s.dest: s for s in declared(group) if s.opt.cli}
    names = list(only) if only is not None else [d for d in settings if d not in set(skip)]
    g = parser.add_argument_group(title, description)
    for dest in names:
        setting = settings[dest]
        if dest in (helps or {}):
            setting = dataclasses.replace(
                setting, opt=dataclasses.replace(setting.opt, help=helps[dest])
            )
        flags = [setting.flag, *setting.opt.aliases, *(aliases or {}).get(dest, ())]
        g.add_argument(
            *flags,
            **argparse_kwargs(
                setting, required=dest in set(required), shown=(shown_defaults or {}).get(dest)
            ),
        )
    return g


def given(args: argparse.Namespace, group: type) -> dict[str, Any]:
    """``group``'s fields, as step keyword arguments, that the command line or the config
    file gave (the others are left to the step's defaults)."""
    out = {}
    for setting in declared(group):
        value = getattr(args, setting.dest, None)
        if value is not None:
            out[setting.name] = tuple(value) if setting.type is tuple else value
    return out


def method_settings() -> list[tuple[str, Declared]]:
    """:func:`fcpts.alloc.declared.method_settings`, imported when the parser is built
    (it imports torch, which must not load with ``fcpts.cli``: see ``main``)."""
    from ..alloc.declared import method_settings as declared_settings

    return declared_settings()


def add_allocator_settings(parser: argparse.ArgumentParser) -> None:
    """One argument group per method holding a flag for each of its settings."""
    by_method: dict[str, list[Declared]] = {}
    for method, setting in method_settings():
        by_method.setdefault(method, []).append(setting)
    for method, settings in by_method.items():
        g = parser.add_argument_group(
            f"{method} method settings", f"used with --method {method}; config key: the flag name"
        )
        for setting in settings:
            g.add_argument(setting.flag, **argparse_kwargs(setting))


def given_allocator_settings(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """The settings of ``method`` given as flags (or config keys); a flag of another
    method is a UserError naming the method it belongs to."""
    out: dict[str, Any] = {}
    for owner, setting in method_settings():
        value = getattr(args, setting.dest, None)
        if value is None:
            continue
        if owner != method:
            if any(o == method and s.dest == setting.dest for o, s in method_settings()):
                continue  # the same flag belongs to the chosen method too
            raise UserError(
                f"{setting.flag} is a setting of --method {owner}, not of {method}: "
                f"drop it or use --method {owner}"
            )
        out[setting.name] = tuple(value) if setting.type is tuple else value
    return out


def methods_help() -> str:
    """The registered methods, for help texts."""
    from ..alloc import Allocator

    return ", ".join(sorted(Allocator.registry))


def flags_of(settings: Iterable[Declared]) -> list[str]:
    return [s.flag for s in settings]
