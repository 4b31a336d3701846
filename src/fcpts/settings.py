"""Settings declared once: a typed field with its help text and, for sweeps, a search range.

A setting is a dataclass field (an allocator's ``Config``, the layer selection, the
sources) or a keyword parameter of a step function, annotated
``Annotated[T, Opt("help text", ...)]``. Everything users see is derived from these
declarations by :func:`declared`: the CLI flags and ``--config`` keys
(:mod:`fcpts.cli.derive`), the KFP component and pipeline parameters
(``components/build.py``), the MLflow params, the Optuna search space
(:mod:`fcpts.sweep.space`) and the README's settings tables (:func:`markdown_table`).

Pure Python: no torch, no MLflow, no KFP.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import reprlib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import UserError


@dataclass(frozen=True)
class Search:
    """A sweep's default range for a setting: ``low..high`` (floats on a log scale unless
    ``log=False``, integers uniformly) or a set of ``choices``."""

    low: float | None = None
    high: float | None = None
    log: bool = True
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.choices and (self.low is None or self.high is None or self.low > self.high):
            raise ValueError("a Search needs low <= high, or choices")


@dataclass(frozen=True)
class Opt:
    """How one setting is presented: help text and, optionally, its flag name (without the
    leading dashes; default: the name with ``-``), choices, a metavar, a sweep range, and
    whether the CLI and the KFP components expose it."""

    help: str
    flag: str | None = None
    aliases: tuple[str, ...] = ()
    choices: tuple[Any, ...] | None = None
    metavar: str | None = None
    search: Search | None = None
    cli: bool = True
    kfp: bool = True
    required: bool = False


@dataclass(frozen=True)
class Declared:
    """One declared setting, resolved: where it lives, its type and default."""

    owner: str
    name: str
    type: Any  # int, float, bool, str, tuple (a list of strings) or dict
    optional: bool
    default: Any
    opt: Opt

    @property
    def flag(self) -> str:
        return "--" + (self.opt.flag or self.name.replace("_", "-"))

    @property
    def dest(self) -> str:
        """The argparse destination and ``--config`` key."""
        return self.flag[2:].replace("-", "_")

    @property
    def has_default(self) -> bool:
        return self.default is not dataclasses.MISSING

    def default_text(self) -> str:
        if not self.has_default or self.default is None:
            return "required" if self.opt.required and not self.has_default else "none"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, tuple):
            return ", ".join(map(str, self.default)) or "none"
        if isinstance(self.default, float):
            return f"{self.default:g}"
        return str(self.default)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(int/float/bool/str/tuple/dict, optional) of a resolved type hint."""
    optional = False
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else str
        origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return type(typing.get_args(hint)[0]), optional
    if hint in (tuple, list) or origin in (tuple, list):
        return tuple, optional
    if hint is dict or origin in (dict, Mapping):
        return dict, optional
    return hint, optional


def _opt_of(hint: Any) -> tuple[Any, Opt | None]:
    if typing.get_origin(hint) is typing.Annotated:
        base, *extras = typing.get_args(hint)
        return base, next((e for e in extras if isinstance(e, Opt)), None)
    return hint, None


def _literal_choices(hint: Any) -> tuple[Any, ...] | None:
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def declared(obj: type | Callable[..., Any], every: bool = False) -> list[Declared]:
    """The declared settings of a dataclass (its fields) or a function (its parameters)
    whose annotation carries an :class:`Opt`, in declaration order; ``every`` also takes
    the fields without one (for type checks)."""
    hints = typing.get_type_hints(obj, include_extras=True)
    if dataclasses.is_dataclass(obj):
        items = [
            (
                f.name,
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
            )
            for f in dataclasses.fields(obj)
        ]
    else:
        items = [
            (p.name, dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default)
            for p in inspect.signature(obj).parameters.values()
        ]
    owner = getattr(obj, "__qualname__", str(obj))
    out = []
    for name, default in items:
        base, opt = _opt_of(hints.get(name))
        if opt is None:
            if not every or name not in hints:
                continue
            opt = Opt("")
        kind, optional = _base_type(base)
        choices = opt.choices or _literal_choices(base)
        if choices is not None and opt.choices is None:
            opt = dataclasses.replace(opt, choices=tuple(choices))
        out.append(Declared(owner, name, kind, optional, default, opt))
    return out


def check_value(setting: Declared, value: Any, where: str) -> Any:
    """``value`` converted to the setting's type, or a one-line UserError naming ``where``
    (the value shown short, however large or deeply nested it is)."""
    if value is None:
        if setting.optional:
            return None
        raise UserError(f"{where} must be given, got null")
    kind = setting.type
    wrong = isinstance(value, bool) and kind in (int, float)
    if kind is bool:
        words, ok = "true or false", isinstance(value, bool)
    elif kind is int:
        words = "a whole number"
        ok = not wrong and isinstance(value, (int, float)) and math.isfinite(value)
        ok = ok and value == int(value)
        value = int(value) if ok else value
    elif kind is float:
        words = "a number"
        ok = not wrong and isinstance(value, (int, float)) and not math.isnan(value)
        value = float(value) if ok else value
    elif kind is str:
        words, ok = "a string", isinstance(value, str)
    elif kind is tuple:
        words = "a list of strings"
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    elif kind is dict:
        words, ok = "a mapping", isinstance(value, Mapping)
    else:
        words, ok = "", True
    if not ok:
        raise UserError(f"{where} must be {words}, got {short(value)}")
    if setting.opt.choices is not None and value not in setting.opt.choices:
        raise UserError(
            f"{where} must be one of {', '.join(map(str, setting.opt.choices))}, got {short(value)}"
        )
    return value


def check_values(obj: type | Callable[..., Any], values: Mapping[str, Any], what: str) -> dict:
    """``values`` checked against the types of ``obj``'s fields or parameters (declared
    with an :class:`Opt` or not); names ``obj`` lacks are left as they are (the owner
    refuses unknown ones)."""
    by_name = {s.name: s for s in declared(obj, every=True)}
    return {
        k: check_value(by_name[k], v, f"{what} {k}") if k in by_name else v
        for k, v in values.items()
    }


def short(value: Any, limit: int = 80) -> str:
    """A short repr of ``value``, built without formatting all of a huge value."""
    shown = reprlib.Repr()
    shown.maxlevel, shown.maxlist, shown.maxdict, shown.maxstring = 3, 4, 4, limit
    text = shown.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown_table(settings: Iterable[Declared], flags: bool = True) -> str:
    """A Markdown table of settings: flag (or name), default, sweep range, help."""
    rows = [
        "| setting | default | sweep range | what it does |",
        "|---|---|---|---|",
    ]
    for s in settings:
        name = f"`{s.flag}`" if flags else f"`{s.name}`"
        rng = ""
        if s.opt.search is not None:
            sr = s.opt.search
            rng = (
                ", ".join(sr.choices)
                if sr.choices
                else f"{sr.low:g} to {sr.high:g}" + (" (log)" if sr.log and s.type is float else "")
            )
        choices = f" ({', '.join(map(str, s.opt.choices))})" if s.opt.choices else ""
        help_text = " ".join(s.opt.help.split()).replace("|", "\\|")
        rows.append(f"| {name} | {s.default_text()} | {rng} | {help_text}{choices} |")
    return "\n".join(rows)
