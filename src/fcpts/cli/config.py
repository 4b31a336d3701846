"""``--config``: options from a YAML or JSON file (flags override the file)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import UserError


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}


def load_config(path: str) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {path} does not exist")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:
        raise UserError(
            f"config file {path} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
            f"{str(exc).splitlines()[0]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return data


def _coerce(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    where = f"config {path}: {key}"
    if value is None:
        return None
    if isinstance(
        action,
        (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction),
    ):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) for v in items):
            raise UserError(f"{where} must be a string or a list of strings")
        return [str(v) for v in items]
    if action.type is not None:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise UserError(f"{where} must be a single {action.type.__name__}, got {value!r}")
        try:
            value = action.type(value)
        except (TypeError, ValueError):
            raise UserError(f"{where} must be a {action.type.__name__}, got {value!r}") from None
    elif not isinstance(value, str):
        if isinstance(value, (dict, list)):
            raise UserError(f"{where} must be a single value, got {value!r}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(
            f"{where} must be one of {', '.join(map(str, action.choices))}, got {value!r}"
        )
    return value


SPECIAL_CONFIG_KEYS = ("settings",)


def apply_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill options not given on the command line from --config (flags override the file)."""
    path = getattr(args, "config", None)
    args.settings = {}
    if not path:
        return
    data = load_config(path)
    subs = _subparsers(parser)
    commands = set(subs)
    known: set[str] = set(SPECIAL_CONFIG_KEYS)
    for sp in subs.values():
        known |= set(_actions(sp))
    merged: dict[str, Any] = {}
    for key, value in data.items():
        norm = str(key).replace("-", "_")
        if norm in commands:
            continue
        merged[norm] = value
    section = data.get(args.command)
    if section is not None:
        if not isinstance(section, dict):
            raise UserError(f"config {path}: section {args.command!r} must be a mapping")
        merged.update({str(k).replace("-", "_"): v for k, v in section.items()})
    unknown = sorted(k for k in merged if k not in known)
    if unknown:
        raise UserError(
            f"config {path}: unknown option {unknown[0]!r} (use the long option names, e.g. target, method)"
        )
    mine = _actions(subs[args.command])
    for key, value in merged.items():
        if key == "settings":
            if not isinstance(value, dict):
                raise UserError(f"config {path}: settings must be a mapping of allocator settings")
            args.settings = dict(value)
            continue
        if key not in mine:
            continue  # an option of another command: a config file may serve several
        if getattr(args, key, None) is None:
            setattr(args, key, _coerce(mine[key], key, value, path))


# ----------------------------------------------------------------------------- helpers
