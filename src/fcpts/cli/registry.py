"""``fcpts promote`` and ``fcpts rollback``: move a registered model's champion alias by hand."""

from __future__ import annotations

import argparse

from .common import Formatter, get_option


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking store holding the registry (default: $MLFLOW_TRACKING_URI, else "
        "the embedded sqlite:///./mlruns/mlflow.db)",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of options (keys: the long options)"
    )


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "promote",
        formatter_class=Formatter,
        help="make a version of a registered model its champion",
        description="Give the alias champion to VERSION of model NAME, whatever the automatic rule "
        "says; the previous champion stays in the history for `fcpts rollback`. The reason is "
        "written to the version's decision_reason tag and description.",
    )
    p.add_argument("name", metavar="NAME", help="registered model name")
    p.add_argument("version", metavar="VERSION", help="version number to promote")
    p.add_argument(
        "--reason", default=None, help="why (default: 'promoted by hand (fcpts promote) on <date>')"
    )
    _add_store(p)

    p = sub.add_parser(
        "rollback",
        formatter_class=Formatter,
        help="give the champion alias back to the previous champion",
        description="Move the alias champion of model NAME back to the previous champion (the "
        "registered model's fcpts.champion_history), e.g. after a bad promotion.",
    )
    p.add_argument("name", metavar="NAME", help="registered model name")
    _add_store(p)


def _version(value: str) -> str:
    from ..errors import UserError

    text = str(value).strip()
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"VERSION must be a version number such as 3, got {value!r}")
    return str(int(text))


def _report(change) -> None:
    before = f"version {change.previous}" if change.previous else "none"
    print(f"{change.name}: champion is version {change.version} (was {before}): {change.reason}")


def cmd_promote(args: argparse.Namespace) -> int:
    from ..tracking.registry import promote

    _report(
        promote(
            args.name,
            _version(args.version),
            tracking_uri=get_option(args, "tracking_uri"),
            reason=get_option(args, "reason"),
        )
    )
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from ..tracking.registry import rollback

    _report(rollback(args.name, tracking_uri=get_option(args, "tracking_uri")))
    return 0
