"""``--config``: options from a YAML or JSON file (flags override the file)."""

from __future__ import annotations

import argparse
import json
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

from ..errors import UserError


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def option_actions(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """A command's options by dest, as config keys name them."""
    return {a.dest: a for a in p._actions if a.dest not in ("help", "config", argparse.SUPPRESS)}


MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: far more than any config needs
# what YAML aliases may expand a config to (see expanded_size): as large as a file at the cap
MAX_EXPANDED_SIZE = MAX_CONFIG_BYTES


def shown(value: Any) -> str:
    """A bounded repr of a value read from a file, for an error message."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict = 3, 6, 6
    short.maxstring = short.maxother = 80
    return short.repr(value)


def file_kind(mode: int) -> str:
    """What a path that is not a regular file is, in words."""
    kinds = (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((words for test, words in kinds if test(mode)), "not a regular file")


def read_config_text(path: str) -> str:
    """The text of a config file: a regular file of at most MAX_CONFIG_BYTES, in UTF-8.

    Opened without blocking (a FIFO does not wait for a writer) and checked on the open
    file, so what is read is what was checked."""
    limit = f"{MAX_CONFIG_BYTES // (1 << 20)} MiB"
    try:
        fd = os.open(Path(path).expanduser(), os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise UserError(f"config file {path}: cannot open it ({exc.strerror})") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UserError(
                f"config file {path} is {file_kind(mode)}, not a regular file: "
                "give a YAML or JSON file"
            )
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(
            f"config file {path} is larger than {limit}, the limit for a config file: "
            "give a YAML or JSON file of options"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"config file {path} is not UTF-8 text (byte {exc.start}): give a YAML or JSON file"
        ) from None


def expanded_size(
    node: Any, sizes: dict[int, int] | None = None, inside: frozenset[int] = frozenset()
) -> int:
    """The size of a composed YAML node with every alias written out: one per collection,
    the length of each scalar (at least one). Counted once per distinct node, so a
    billion-laughs document is measured in microseconds; a node that contains itself (a
    recursive alias) is a UserError."""
    import yaml

    sizes = {} if sizes is None else sizes
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in inside:
        raise UserError("a YAML alias refers to a value that contains it")
    if isinstance(node, yaml.ScalarNode):
        size = max(1, len(node.value))
    else:
        inner = inside | {id(node)}
        children = (
            [c for pair in node.value for c in pair]
            if isinstance(node, yaml.MappingNode)
            else node.value
        )
        size = 1 + sum(expanded_size(c, sizes, inner) for c in children)
    sizes[id(node)] = size
    return size


def load_yaml(text: str) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand it past MAX_EXPANDED_SIZE
    (a billion-laughs bomb) or refer to themselves."""
    import yaml

    class ConfigLoader(yaml.SafeLoader):
        def get_single_data(self) -> Any:
            node = self.get_single_node()
            if node is None:
                return None
            if expanded_size(node) > MAX_EXPANDED_SIZE:
                raise UserError(
                    f"its YAML aliases (*name) expand it to more than "
                    f"{MAX_EXPANDED_SIZE // (1 << 20)} MiB: write the values out"
                )
            return self.construct_document(node)

    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader)


def load_config(path: str) -> dict[str, Any]:
    text = read_config_text(path)
    kind = "JSON" if Path(path).suffix == ".json" else "YAML"
    try:
        data = json.loads(text) if kind == "JSON" else load_yaml(text)
    except UserError as exc:
        raise UserError(f"config file {path} is refused: {exc}") from None
    except Exception as exc:
        raise UserError(
            f"config file {path} is not valid {kind}: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of option names to values")
    return data


def option_value(action: argparse.Action, key: str, value: Any, path: str) -> Any:
    """A config value for an option, checked and converted as its flag would be."""
    where = f"config {path}: {key}"
    if value is None:
        return None
    if isinstance(
        action,
        (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction),
    ):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {shown(value)}")
        return value
    if isinstance(action, argparse._AppendAction):
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (str, int, float)) for v in items):
            raise UserError(f"{where} must be a string or a list of strings")
        return [str(v) for v in items]
    if action.type is not None:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise UserError(f"{where} must be a single {action.type.__name__}, got {shown(value)}")
        try:
            converted = action.type(value)
        except (TypeError, ValueError):
            raise UserError(
                f"{where} must be a {action.type.__name__}, got {shown(value)}"
            ) from None
        if isinstance(value, float) and isinstance(converted, int) and converted != value:
            raise UserError(f"{where} must be a whole number, got {shown(value)}")
        value = converted
    elif not isinstance(value, str):
        if isinstance(value, (dict, list)):
            raise UserError(f"{where} must be a single value, got {shown(value)}")
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise UserError(
            f"{where} must be one of {', '.join(map(str, action.choices))}, got {shown(value)}"
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
        known |= set(option_actions(sp))
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
            f"config {path}: unknown option {shown(unknown[0])} (use the long option names, e.g. target, method)"
        )
    mine = option_actions(subs[args.command])
    for key, value in merged.items():
        if key == "settings":
            if not isinstance(value, dict):
                raise UserError(f"config {path}: settings must be a mapping of allocator settings")
            args.settings = dict(value)
            continue
        if key not in mine:
            continue  # an option of another command: a config file may serve several
        if getattr(args, key, None) is None:
            setattr(args, key, option_value(mine[key], key, value, path))
