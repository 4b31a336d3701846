"""``fcpts submit``: run a pipeline on a Kubeflow Pipelines cluster, once or on a schedule.

Compiles ``pipelines/sparsify.py`` (or ``pipelines/sweep.py``), maps the options of the
same config file ``fcpts run`` reads to the pipeline's parameters (for sparsify through
:func:`fcpts.cli.arguments.pipeline_arguments`, as ``fcpts run`` does), and creates a run
with ``kfp.Client``, or with ``--schedule`` (:mod:`fcpts.cli.schedule`) a recurring run, in
the named experiment (:mod:`fcpts.cli.kfp_cluster`).

The main CLI adds the command with ``submit.add_parsers(sub)`` and ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UserError
from .cluster import add_cluster_options, cluster_from_args, cluster_keys
from .common import PROG, Formatter, say
from .kfp_cluster import DEFAULT_EXPERIMENT, PIPELINES, SubmitConfig, load_pipeline, submit
from .schedule import CRON_HELP, parse_schedule

# the config sections of the commands whose options a shared config file may hold
SECTIONS = ("calibrate", "allocate", "evaluate", "register", "run", "compile", "sweep", "submit")
PIPELINE_SECTION = {"sparsify": "run", "sweep": "sweep"}
# options of `fcpts run` / `fcpts sweep` that only concern this machine, and of submit itself
LOCAL_KEYS = frozenset({"root", "cache", "verbose", "quiet", "out", "config"})
SUBMIT_KEYS = frozenset({"host", "schedule", "experiment", "pipeline", "run_name", "namespace"})


def settings_keys() -> tuple[str, ...]:
    """The options that fold into the JSON ``settings``: the config's mapping, ``--set``
    and every declared method setting (:mod:`fcpts.alloc.declared`)."""
    from ..alloc.declared import method_settings

    return ("settings", "settings_flags", *(s.dest for _, s in method_settings()))


def selection_keys() -> tuple[str, ...]:
    """The options that fold into the JSON ``selection``: the layer selection's fields."""
    from ..core import LayerSelection
    from ..settings import declared

    return tuple(s.dest for s in declared(LayerSelection))


@dataclass(frozen=True)
class Parameter:
    type: str  # the KFP input type: String, Integer, Float, Boolean
    required: bool = False
    default: Any = None


def pipeline_parameters(pipeline: Any) -> dict[str, Parameter]:
    """The parameters of a compiled-able KFP pipeline function (name -> type, required)."""
    return {
        name: Parameter(str(spec.type), not spec.optional, spec.default)
        for name, spec in pipeline.component_spec.inputs.items()
    }


def config_options(data: Mapping[str, Any], pipeline: str = "sparsify") -> dict[str, Any]:
    """The options a config file gives the pipeline's command: its top-level options and
    its section (``run:`` for sparsify, ``sweep:`` for sweep) over them."""
    section = PIPELINE_SECTION[pipeline]
    merged = {str(k).replace("-", "_"): v for k, v in data.items() if str(k) not in SECTIONS}
    own = data.get(section)
    if own is not None:
        if not isinstance(own, Mapping):
            raise UserError(f"config section {section!r} must be a mapping of options")
        merged.update({str(k).replace("-", "_"): v for k, v in own.items()})
    return merged


def pipeline_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options that go to the pipeline: not this machine's, not submit's, not None;
    ``bounds`` given as a mapping ``{pattern: [min, max]}`` written as --bounds values."""
    given = {
        k: v
        for k, v in options.items()
        if v is not None and k not in LOCAL_KEYS | SUBMIT_KEYS | cluster_keys()
    }
    if isinstance(given.get("bounds"), Mapping):
        given["bounds"] = [f"{p}={lo}:{hi}" for p, (lo, hi) in given["bounds"].items()]
    return given


def run_parser() -> argparse.ArgumentParser:
    """The parser of ``fcpts run``, whose options the sparsify pipeline takes."""
    from . import run

    sub = argparse.ArgumentParser(prog=PROG).add_subparsers(dest="command")
    run.add_parsers(sub)
    return sub.choices["run"]


def sparsify_arguments(options: Mapping[str, Any], where: str = "file") -> dict[str, Any]:
    """The sparsify pipeline's arguments from ``fcpts run`` options (see
    :func:`config_options`), each checked and converted as ``fcpts run --config`` does."""
    from .arguments import pipeline_arguments
    from .common import allocator_settings, tracking_from_args
    from .config import option_actions, option_value

    parser = run_parser()
    actions = option_actions(parser)
    given = pipeline_options(options)
    unknown = sorted(k for k in given if k not in actions and k != "settings")
    if unknown:
        raise UserError(
            f"config option {unknown[0]!r} is not a parameter of the sparsify pipeline "
            f"(its options are those of `{PROG} run`: {', '.join(sorted(actions))})"
        )
    args = parser.parse_args([])
    for key, value in given.items():
        if key == "settings":
            if not isinstance(value, Mapping):
                raise UserError("config settings must be a mapping of allocator settings")
            args.settings = dict(value)
        else:
            setattr(args, key, option_value(actions[key], key, value, where))
    return pipeline_arguments(args, allocator_settings(args), tracking_from_args(args))


def _strings(key: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
        raise UserError(f"config {key} must be a string or a list of strings, got {value!r}")
    return [str(v) for v in items]


def _folded(options: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` and ``selection`` as fcpts run builds them from its options."""
    from .common import allocator_settings, selection_overrides

    out: dict[str, Any] = {}
    if any(options.get(k) is not None for k in settings_keys()):
        settings = options.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise UserError("config settings must be a mapping of allocator settings")
        flags = options.get("settings_flags")
        ns = argparse.Namespace(
            **{k: options.get(k) for k in settings_keys()},
            method=options.get("method"),
        )
        ns.settings = dict(settings)
        ns.settings_flags = _strings("settings_flags", flags) if flags is not None else None
        out["settings"] = allocator_settings(ns)
    if any(options.get(k) is not None for k in selection_keys()):
        values = {k: options.get(k) for k in selection_keys()}
        for key in ("include", "exclude", "keep_dense", "bounds"):
            if values[key] is not None:
                values[key] = _strings(key, values[key])
        out["selection"] = selection_overrides(argparse.Namespace(**values))
    return out


def _coerce(name: str, kind: str, value: Any) -> Any:
    where = f"config {name}"
    if kind == "String":
        return json.dumps(value) if isinstance(value, (Mapping, list)) else str(value)
    if kind == "Boolean":
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{where} must be a number, got {value!r}") from None
    if kind == "Integer":
        if number != int(number):
            raise UserError(f"{where} must be a whole number, got {value!r}")
        return int(number)
    return number


def parameter_arguments(
    options: Mapping[str, Any], parameters: Mapping[str, Parameter], pipeline: str = "sweep"
) -> dict[str, Any]:
    """A pipeline's arguments by parameter name (the sweep pipeline's, whose options have
    no command of their own to map them): options named like a parameter map to it;
    ``settings``/``iters``/``lam``/``joint``/``settings_flags`` fold into the JSON
    ``settings`` and the layer-selection options into the JSON ``selection``, as ``fcpts
    run`` does; any other option is a UserError."""
    given = pipeline_options(options)
    folded = _folded(given)
    arguments: dict[str, Any] = {}
    for key, value in given.items():
        if key in settings_keys() or key in selection_keys():
            continue
        if key not in parameters:
            raise UserError(
                f"config option {key!r} is not a parameter of the {pipeline} pipeline "
                f"(its parameters: {', '.join(sorted(parameters))})"
            )
        arguments[key] = value
    for key, value in folded.items():
        if key in arguments:
            raise UserError(f"config gives {key!r} both directly and through its options: keep one")
        if key not in parameters:
            raise UserError(f"the {pipeline} pipeline takes no {key!r}: leave out its options")
        arguments[key] = value
    missing = sorted(n for n, p in parameters.items() if p.required and n not in arguments)
    if missing:
        raise UserError(f"the {pipeline} pipeline needs {missing[0]!r}: add it to the config file")
    return {k: _coerce(k, parameters[k].type, v) for k, v in sorted(arguments.items())}


# -------------------------------------------------------------------------------- CLI


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "submit",
        formatter_class=Formatter,
        help="run the pipeline on a Kubeflow Pipelines cluster, once or on a schedule",
        description="Compile the sparsify (or sweep) pipeline and create a run on a KFP cluster, "
        "or with --schedule a recurring run, in --experiment. Pipeline parameters come from "
        "--config: the same file `fcpts run` reads (top-level options and its run: section; "
        "sweep: for --pipeline sweep). Credentials never go in --host: KFP reads a token from "
        "KF_PIPELINES_SA_TOKEN_PATH; the steps read theirs from Kubernetes secrets.",
    )
    p.add_argument("--host", metavar="URL", help="the KFP API, e.g. http://localhost:8080")
    p.add_argument(
        "--schedule",
        metavar="CRON",
        help=f"a recurring run: {CRON_HELP}; or @hourly, @daily, @weekly, @monthly, or @every 6h",
    )
    p.add_argument(
        "--experiment", metavar="NAME", help=f"KFP experiment (default: {DEFAULT_EXPERIMENT})"
    )
    p.add_argument("--pipeline", choices=PIPELINES, help="which pipeline (default: sparsify)")
    p.add_argument("--run-name", metavar="NAME", help="run name (default: fcpts-<pipeline>-<time>)")
    p.add_argument("--namespace", metavar="NS", help="Kubernetes namespace (multi-user clusters)")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of pipeline options")
    add_cluster_options(p)


def cmd_submit(args: argparse.Namespace) -> int:
    from kfp import compiler

    from .config import load_config

    config = SubmitConfig(
        host=args.host or "",
        pipeline=args.pipeline or "sparsify",
        schedule=parse_schedule(args.schedule) if args.schedule else None,
        experiment=args.experiment or DEFAULT_EXPERIMENT,
        run_name=args.run_name,
        namespace=args.namespace,
    )
    path = getattr(args, "config", None)
    options = config_options(load_config(path) if path else {}, config.pipeline)
    pipeline = load_pipeline(config.pipeline, cluster_from_args(args))
    if config.pipeline == "sparsify":  # fail here, not in a pod: same checks as fcpts run
        from .common import check_allocation_options

        arguments = sparsify_arguments(options, path or "file")
        settings = json.loads(arguments["settings"])
        check_allocation_options(
            arguments["target"], arguments["method"], settings, arguments["score"]
        )
    else:
        arguments = parameter_arguments(options, pipeline_parameters(pipeline), config.pipeline)
    with tempfile.TemporaryDirectory(prefix="fcpts-submit-") as tmp:
        package = Path(tmp, f"{config.pipeline}.yaml")
        compiler.Compiler().compile(pipeline, str(package))
        result = submit(config, package, arguments)
    when = f" on schedule {args.schedule!r}" if config.schedule is not None else ""
    say(
        f"{PROG} submit: {config.pipeline} pipeline as {result['kind']} {result['name']}{when} in experiment {config.experiment}"
    )
    print(f"{result['kind']} {result['id']}: {result['url']}")
    return 0


COMMANDS = {"submit": cmd_submit}
