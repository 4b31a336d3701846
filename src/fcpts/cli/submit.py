"""``fcpts submit``: run a pipeline on a Kubeflow Pipelines cluster, once or on a schedule.

Compiles ``pipelines/sparsify.py`` (or ``pipelines/sweep.py``), maps the options of the
same config file ``fcpts run`` reads to the pipeline's parameters
(:func:`pipeline_arguments`), and creates a run with ``kfp.Client``, or with
``--schedule`` a recurring run, in the named experiment.

Schedules follow KFP: a cron expression of six fields, seconds first (the robfig/cron
format KFP documents for ``create_recurring_run``), one of the descriptors
``@hourly``/``@daily``/``@midnight``/``@weekly``/``@monthly``/``@yearly``/``@annually``
(sent as the equivalent six-field expression), or ``@every DURATION`` (Go durations such
as ``90m`` or ``1h30m``; sent as KFP's periodic trigger).

The main CLI adds the command with ``submit.add_parsers(sub)`` and ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ServiceError, UserError
from .common import PROG, _Formatter, _say

PIPELINES = ("sparsify", "sweep")
DEFAULT_EXPERIMENT = "fcpts"
CRON_HELP = "KFP cron has six fields, seconds first: e.g. '0 0 3 * * *' for 03:00 daily"
DESCRIPTORS = {
    "@yearly": "0 0 0 1 1 *",
    "@annually": "0 0 0 1 1 *",
    "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0",
    "@daily": "0 0 0 * * *",
    "@midnight": "0 0 0 * * *",
    "@hourly": "0 0 * * * *",
}
# the config sections of the commands whose options a shared config file may hold
SECTIONS = ("calibrate", "allocate", "evaluate", "register", "run", "compile", "sweep", "submit")
PIPELINE_SECTION = {"sparsify": "run", "sweep": "sweep"}
# options of `fcpts run` / `fcpts sweep` that only concern this machine, and of submit itself
LOCAL_KEYS = frozenset({"root", "cache", "verbose", "quiet", "out", "config"})
SUBMIT_KEYS = frozenset({"host", "schedule", "experiment", "pipeline", "run_name", "namespace"})
SETTINGS_KEYS = ("settings", "settings_flags", "iters", "lam", "joint")
SELECTION_KEYS = ("include", "exclude", "keep_dense", "bounds", "min_sparsity", "max_sparsity")

# ------------------------------------------------------------------------- schedules

_FIELDS = (  # name, low, high, names (for months and weekdays)
    ("seconds", 0, 59, ()),
    ("minutes", 0, 59, ()),
    ("hours", 0, 23, ()),
    ("day of month", 1, 31, ()),
    ("month", 1, 12, ("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC").split()),
    ("day of week", 0, 6, ("SUN MON TUE WED THU FRI SAT").split()),
)
_DURATION_PART = r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)"
_DURATION_RE = re.compile(rf"^(?:{_DURATION_PART})+$")
_DURATION_PART_RE = re.compile(_DURATION_PART)
_UNIT_SECONDS = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}


@dataclass(frozen=True)
class Schedule:
    """A KFP trigger: a six-field cron expression, or a period in seconds."""

    cron: str | None = None
    interval_second: int | None = None


def _cron_value(text: str, low: int, high: int, names: tuple[str, ...], field: str) -> int:
    if text.upper() in names:
        return low + names.index(text.upper())
    if not text.isdigit():
        raise ValueError(f"{text!r} in the {field} field is not a number")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{value} in the {field} field is outside {low}-{high}")
    return value


def _check_cron_field(text: str, field: str, low: int, high: int, names: tuple[str, ...]) -> None:
    for item in text.split(","):
        base, slash, step = item.partition("/")
        if slash and (not step.isdigit() or int(step) == 0):
            raise ValueError(f"step {step!r} in the {field} field must be a whole number >= 1")
        if base in ("*", "?"):
            if base == "?" and field not in ("day of month", "day of week"):
                raise ValueError(f"'?' is allowed only in the day fields, not in {field}")
            continue
        lo, dash, hi = base.partition("-")
        a = _cron_value(lo, low, high, names, field)
        if dash and a > _cron_value(hi, low, high, names, field):
            raise ValueError(f"range {base!r} in the {field} field runs backwards")


def _duration_seconds(text: str) -> int:
    if not _DURATION_RE.match(text):
        raise ValueError(f"{text!r} is not a duration such as 90m, 1h30m or 3600s")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"{text!r} must be a whole number of seconds, at least 1s")
    return int(seconds)


def parse_schedule(text: str) -> Schedule:
    """A validated KFP schedule; a UserError explains the format on a mistake."""
    spec = " ".join(str(text).split())
    try:
        if not spec:
            raise ValueError("it is empty")
        if spec.lower() in DESCRIPTORS:
            return Schedule(cron=DESCRIPTORS[spec.lower()])
        if spec.lower().startswith("@every "):
            return Schedule(interval_second=_duration_seconds(spec[len("@every ") :]))
        if spec.startswith("@"):
            raise ValueError(
                f"unknown descriptor {spec.split()[0]!r} (use {', '.join(DESCRIPTORS)} or @every 1h)"
            )
        fields = spec.split(" ")
        if len(fields) != 6:
            hint = (
                " (a standard 5-field cron lacks the seconds: put 0 in front)"
                if len(fields) == 5
                else ""
            )
            raise ValueError(f"it has {len(fields)} fields{hint}")
        for value, (field, low, high, names) in zip(fields, _FIELDS, strict=True):
            _check_cron_field(value, field, low, high, names)
    except ValueError as exc:
        raise UserError(
            f"--schedule {text!r}: {exc}; {CRON_HELP}, or @daily, or @every 6h"
        ) from None
    return Schedule(cron=spec)


# ------------------------------------------------------------------------------ hosts


def check_host(host: str) -> str:
    """The KFP API URL, ``http(s)://host[:port][/path]``, without a trailing slash."""
    text = str(host or "").strip()
    where = "--host"
    if not text:
        raise UserError(f"{where} is required: the KFP API URL, e.g. http://localhost:8080")
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise UserError(
            f"{where} is not a valid URL ({exc}); e.g. https://kubeflow.example.com/pipeline"
        ) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(
            f"{where} must start with http:// or https:// and name a host, e.g. http://localhost:8080"
        )
    if url.username is not None or url.password is not None or "@" in url.netloc:
        raise UserError(
            f"{where} must not carry credentials: give the URL without user:password@ and "
            "authenticate with KF_PIPELINES_SA_TOKEN_PATH or the cluster's login"
        )
    if url.query or url.fragment:
        raise UserError(f"{where} must not have a query or a fragment: give the API's base URL")
    if port == 0:
        raise UserError(f"{where} port must be 1-65535")
    return urllib.parse.urlunsplit((url.scheme, url.netloc, url.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class SubmitConfig:
    """A validated ``fcpts submit``."""

    host: str
    pipeline: str = "sparsify"
    schedule: Schedule | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", check_host(self.host))
        if self.pipeline not in PIPELINES:
            raise UserError(
                f"--pipeline must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}"
            )
        if not str(self.experiment).strip():
            raise UserError("--experiment is empty: give an experiment name, e.g. fcpts")
        if self.namespace is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace
        ):
            raise UserError(f"--namespace {self.namespace!r} is not a Kubernetes namespace name")


# ------------------------------------------------------------------- pipeline options


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


def _strings(key: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in items):
        raise UserError(f"config {key} must be a string or a list of strings, got {value!r}")
    return [str(v) for v in items]


def _folded(options: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` and ``selection`` as fcpts run builds them from its options."""
    from .common import allocator_settings, selection_overrides

    out: dict[str, Any] = {}
    if any(options.get(k) is not None for k in SETTINGS_KEYS):
        settings = options.get("settings") or {}
        if not isinstance(settings, Mapping):
            raise UserError("config settings must be a mapping of allocator settings")
        flags = options.get("settings_flags")
        ns = argparse.Namespace(
            settings=dict(settings),
            settings_flags=_strings("settings_flags", flags) if flags is not None else None,
            iters=options.get("iters"),
            lam=options.get("lam"),
            joint=options.get("joint"),
            method=options.get("method"),
        )
        out["settings"] = allocator_settings(ns)
    if any(options.get(k) is not None for k in SELECTION_KEYS):
        values = {k: options.get(k) for k in SELECTION_KEYS}
        bounds = values["bounds"]
        if isinstance(bounds, Mapping):
            values["bounds"] = [f"{p}={lo}:{hi}" for p, (lo, hi) in bounds.items()]
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


def pipeline_arguments(
    options: Mapping[str, Any], parameters: Mapping[str, Parameter], pipeline: str = "sparsify"
) -> dict[str, Any]:
    """The pipeline's arguments from ``fcpts run`` options (see :func:`config_options`).

    Options named like a parameter map to it; ``settings``/``iters``/``lam``/``joint``/
    ``settings_flags`` fold into the JSON ``settings`` and ``include``/``exclude``/
    ``keep_dense``/``bounds``/``min_sparsity``/``max_sparsity`` into the JSON
    ``selection``, as ``fcpts run`` does. Options of this machine only (``root``,
    ``cache``, ...) and of submit itself are skipped; any other option is a UserError.
    """
    given = {
        k: v for k, v in options.items() if v is not None and k not in LOCAL_KEYS | SUBMIT_KEYS
    }
    folded = _folded(given)
    arguments: dict[str, Any] = {}
    for key, value in given.items():
        if key in SETTINGS_KEYS or key in SELECTION_KEYS:
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


# -------------------------------------------------------------------------- submitting


@contextlib.contextmanager
def _kfp_errors(host: str, action: str) -> Iterator[None]:
    """KFP client failures as a ServiceError (or UserError) naming the host."""
    try:
        yield
    except (UserError, ServiceError):
        raise
    except Exception as exc:
        status = getattr(exc, "status", None)
        if isinstance(status, int) and status:
            reason = getattr(exc, "reason", "") or ""
            if status in (401, 403):
                raise UserError(
                    f"cannot {action}: the KFP API at {host} refused the request ({status} "
                    f"{reason}); log in or set KF_PIPELINES_SA_TOKEN_PATH to a service-account token"
                ) from None
            if status == 404:
                raise UserError(
                    f"cannot {action}: no KFP API at {host} (404); check --host, e.g. "
                    "http://localhost:8080 or https://kubeflow.example.com/pipeline"
                ) from None
            raise ServiceError(
                f"cannot {action}: the KFP API at {host} answered {status} {reason}"
            ) from None
        import urllib3.exceptions

        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            raise ServiceError(
                f"cannot {action}: cannot reach the KFP API at {host} "
                f"({type(exc).__name__}); check --host and that the cluster is up"
            ) from None
        raise


def load_pipeline(name: str) -> Any:
    """The pipeline function of ``pipelines/<name>.py`` in the checkout (with retries)."""
    import importlib
    import sys

    from .pipeline import project_root

    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"pipelines.{name}").build(retries=True)


def submit(
    config: SubmitConfig, package: str | Path, arguments: Mapping[str, Any], client: Any = None
) -> dict[str, str]:
    """Create the run (or recurring run) of a compiled pipeline package; return its kind,
    id, name and UI link."""
    import warnings

    import kfp

    run_name = config.run_name or f"fcpts-{config.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    ui = f"{config.host}/#"
    if client is None:
        with _kfp_errors(config.host, "connect"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=config.host, namespace=config.namespace or "kubeflow")
    if config.schedule is None:
        with _kfp_errors(config.host, f"submit the {config.pipeline} pipeline"):
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=dict(arguments),
                run_name=run_name,
                experiment_name=config.experiment,
                namespace=config.namespace,
            )
        run_id = str(result.run_id)
        return {"kind": "run", "id": run_id, "name": run_name, "url": f"{ui}/runs/details/{run_id}"}
    with _kfp_errors(config.host, f"schedule the {config.pipeline} pipeline"):
        experiment = client.create_experiment(config.experiment, namespace=config.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=run_name,
            cron_expression=config.schedule.cron,
            interval_second=config.schedule.interval_second,
            params=dict(arguments),
            pipeline_package_path=str(package),
            max_concurrency=1,
            no_catchup=True,
        )
    job_id = str(job.recurring_run_id)
    url = f"{ui}/recurringrun/details/{job_id}"
    return {"kind": "recurring run", "id": job_id, "name": run_name, "url": url}


# -------------------------------------------------------------------------------- CLI


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "submit",
        formatter_class=_Formatter,
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
    data = load_config(args.config) if getattr(args, "config", None) else {}
    pipeline = load_pipeline(config.pipeline)
    parameters = pipeline_parameters(pipeline)
    arguments = pipeline_arguments(
        config_options(data, config.pipeline), parameters, config.pipeline
    )
    if config.pipeline == "sparsify":  # fail here, not in a pod: same checks as fcpts run
        from .common import _check_allocation_options

        def value(name: str) -> Any:
            return arguments.get(name, parameters[name].default)

        _check_allocation_options(
            value("target"), value("method"), json.loads(value("settings") or "{}"), value("score")
        )
    with tempfile.TemporaryDirectory(prefix="fcpts-submit-") as tmp:
        package = Path(tmp, f"{config.pipeline}.yaml")
        compiler.Compiler().compile(pipeline, str(package))
        result = submit(config, package, arguments)
    when = f" on schedule {args.schedule!r}" if config.schedule is not None else ""
    _say(
        f"{PROG} submit: {config.pipeline} pipeline as {result['kind']} {result['name']}{when} in experiment {config.experiment}"
    )
    print(f"{result['kind']} {result['id']}: {result['url']}")
    return 0


COMMANDS = {"submit": cmd_submit}
