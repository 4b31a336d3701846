"""The ``fcpts`` command line: calibrate, allocate, evaluate, register, run, compile.

Exit codes: 0 success; 2 a mistake the user can fix (bad option, missing or malformed
input, impossible target); 1 anything else. Errors are one line on stderr
(``fcpts: error: ...``); set FCPTS_DEBUG=1 to see the traceback of an unexpected error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FcptsError, UserError

PROG = "fcpts"
RUN_DEFAULT_TARGET = 0.5
RUN_DEFAULT_ITERS = 200
LIBRARY_ITERS = 200  # fcpts.alloc.fcpts.FCPTS.Config.iters
DEFAULT_TOLERANCE = 0.05
DEFAULT_ROOT = "runs"
DEFAULT_PIPELINE_FILE = "sparsify_pipeline.yaml"
PIPELINE_STEPS = ("calibrate", "allocate", "evaluate", "register")
METHODS_HELP = "uniform, global, erk, owl, fcpts"

MODEL_HELP = (
    "model source: demo:minilm, demo:digits-cnn, a Hugging Face / sentence-transformers folder, "
    "a TorchScript file, or module:function (or file.py:function) that builds the nn.Module "
    "(with --weights)"
)
DATA_HELP = (
    "data source: a text file (one sentence per line, for Hugging Face encoders), an ImageFolder "
    "folder (root/<class>/<image>), or tensors in .safetensors/.npz (key x, optional y labels), "
    ".npy (x) or .pt (a tensor or {'x', 'y'}, read weights-only); optional for the demos. "
    "Samples are split in thirds by a seeded permutation: calibration, validation, evaluation"
)


# ----------------------------------------------------------------------------- parser


class _Formatter(argparse.HelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32, width=100)


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("general")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (keys are the long option names, with - or _; "
        "a section named after the command overrides the top level; flags override the file)",
    )
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where to compute: auto (CUDA if present, else CPU), cpu or cuda (default: auto)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=None,
        metavar="N",
        help="seed of the data split and of the learned method (default: 0)",
    )
    g.add_argument(
        "--quiet",
        action="store_true",
        default=None,
        help="no progress bars (they are shown only when stderr is a terminal anyway)",
    )


def _add_sources(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        metavar="SRC",
        default=None,
        help=MODEL_HELP + ("" if model_required else "; not needed with --calibration"),
    )
    g.add_argument(
        "--weights",
        metavar="FILE",
        default=None,
        help="weights for a module:function model: .safetensors, or a .pt/.pth/.bin state_dict "
        "(loaded with torch.load(weights_only=True))",
    )
    g.add_argument("--data", metavar="SRC", default=None, help=DATA_HELP)
    g.add_argument(
        "--task",
        choices=("auto", "classifier", "encoder", "regression"),
        default=None,
        help="how to run and compare the model: classifier (top-1), encoder (embedding cosine "
        "and nearest-neighbour agreement), regression (relative MSE of outputs); auto picks "
        "from the source: the demo's task, encoder for Hugging Face folders, classifier when "
        "the data has labels, else regression (default: auto)",
    )
    g.add_argument(
        "--image-size",
        type=int,
        default=None,
        metavar="N",
        help="resize ImageFolder images to N x N (default: keep; they must then share one size)",
    )
    g.add_argument(
        "--image-mode",
        choices=("RGB", "L"),
        default=None,
        help="ImageFolder colour mode: RGB (3 channels) or L (grey, 1 channel) (default: RGB)",
    )


def _add_calibration(p: argparse.ArgumentParser, score_help: str | None = None) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument(
        "--score",
        choices=("auto", "magnitude", "wanda"),
        default=None,
        help=score_help
        or "importance score: magnitude |w|, or wanda |w|*||x|| (activation-aware: calibration "
        "records per-layer input statistics); auto, the library's default, is wanda whenever there "
        "is calibration data, which there always is here (default: auto)",
    )
    g.add_argument(
        "--calibration-samples",
        "--samples",
        dest="calibration_samples",
        type=int,
        default=None,
        metavar="N",
        help="calibration samples (default: the source's: 512 MiniLM sentences, "
        "300 digits, 256 otherwise)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="calibration batch size; the learned method's speed depends on it "
        "(default: 16 for encoders, 64 for demo:digits-cnn, 32 otherwise)",
    )


def _add_selection(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "layer selection",
        "Patterns are shell globs on module names (encoder.layer.*.attention.*) or regexes written "
        "re:<expr>; repeat an option or separate patterns by commas. Each option given replaces "
        "the source's default for that field (demo:minilm and Hugging Face models exclude pooler.*).",
    )
    g.add_argument(
        "--include",
        action="append",
        default=None,
        metavar="PATTERN",
        help="prune only matching layers",
    )
    g.add_argument(
        "--exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="leave matching layers out entirely (they do not count towards the target)",
    )
    g.add_argument(
        "--keep-dense",
        action="append",
        default=None,
        metavar="PATTERN",
        help="keep matching layers dense (they count towards the target)",
    )
    g.add_argument(
        "--bounds",
        action="append",
        default=None,
        metavar="PATTERN=MIN:MAX",
        help="per-layer sparsity bounds for matching layers, e.g. 'classifier.*=0:0.5'",
    )
    g.add_argument(
        "--min-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="lowest sparsity of any layer (default: 0)",
    )
    g.add_argument(
        "--max-sparsity",
        type=float,
        default=None,
        metavar="S",
        help="highest sparsity of any layer (default: 1)",
    )


def _add_allocator(p: argparse.ArgumentParser, target_default: float | None) -> None:
    g = p.add_argument_group("allocation")
    shown = f" (default: {target_default:g})" if target_default is not None else " (required)"
    g.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="S",
        help="global sparsity: the fraction of prunable weights that will be zero, "
        "strictly between 0 and 1; landed exactly (round(S x N) zeros)" + shown,
    )
    g.add_argument(
        "--method",
        default=None,
        metavar="NAME",
        help=f"allocation method: {METHODS_HELP} (default: fcpts, the learned allocation)",
    )
    g.add_argument(
        "--iters",
        type=int,
        default=None,
        metavar="N",
        help="fcpts: optimisation iterations, one calibration batch each (library default: 200"
        + (f"; `run` default: {RUN_DEFAULT_ITERS}" if target_default is not None else "")
        + ")",
    )
    g.add_argument(
        "--lam",
        type=float,
        default=None,
        metavar="X",
        help="fcpts: weight of the sparsity constraint |S(t) - S*| (library default: 1.0)",
    )
    g.add_argument(
        "--no-joint",
        dest="joint",
        action="store_false",
        default=None,
        help="fcpts: turn off joint reconstruction of the kept weights, biases and norms "
        "(the kept weights stay bit-for-bit those of the dense model)",
    )
    g.add_argument(
        "--set",
        dest="settings_flags",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="any other allocator setting, e.g. --set schedule=cosine --set weight_lr=2e-4 "
        "(config file: a 'settings' mapping)",
    )
    g.add_argument(
        "--recalibrate-bn",
        action="store_true",
        default=None,
        help="re-estimate BatchNorm statistics of the sparse model on the calibration data",
    )


def _add_evaluation(p: argparse.ArgumentParser, samples_alias: bool) -> None:
    g = p.add_argument_group("evaluation")
    names = ["--evaluation-samples", "--samples"] if samples_alias else ["--evaluation-samples"]
    g.add_argument(
        *names,
        dest="evaluation_samples",
        type=int,
        default=None,
        metavar="N",
        help="held-out evaluation samples, disjoint from calibration (default: the source's: "
        "512 MiniLM sentences, 300 digits, 512 otherwise)",
    )
    g.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluation batch size, also the batch timed for latency (default: 64)",
    )
    g.add_argument(
        "--latency-seconds",
        type=float,
        default=None,
        metavar="S",
        help="time budget of each CPU latency measurement (default: 1)",
    )


def _add_gate(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("approval gate")
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help="largest allowed quality drop versus dense, in the metric's units (top-1, "
        f"cosine, relative MSE) (default: {DEFAULT_TOLERANCE:g})",
    )
    if required:
        g.add_argument(
            "--registry",
            default=None,
            metavar="MODULE:FUNCTION",
            help="registry called with the approved model (a fcpts.steps.RegistryRequest); "
            "default: $FCPTS_REGISTRY, else the decision is recorded only",
        )
        g.add_argument(
            "--name",
            default=None,
            help="name to register under (default: <model>-<method>-<target>)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=_Formatter,
        description="fcpts: make a trained PyTorch model sparse without retraining, at exactly the "
        "global sparsity you ask for, with a learned per-layer allocation.",
        epilog="Steps: calibrate -> allocate -> evaluate -> register; `run` does all four through the "
        "Kubeflow Pipelines local runner, `compile` writes the pipeline for a cluster.\n"
        "Exit codes: 0 success, 2 a mistake in the input (one line on stderr), 1 anything else.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "calibrate",
        formatter_class=_Formatter,
        help="record calibration data, dense outputs and statistics",
        description="Resolve the model and the calibration data, check that they fit (one forward pass), "
        "and write a calibration folder: the batches, the dense model's reference outputs and, for "
        "activation-aware scores, per-layer input statistics (calibration.safetensors), described "
        "with sources, sample count, shapes and sha256 digests in calibration.json.",
    )
    _add_sources(p)
    _add_calibration(p)
    _add_selection(p)
    p.add_argument(
        "--out", metavar="DIR", default=None, help="calibration folder to write (required)"
    )
    _add_common(p)

    p = sub.add_parser(
        "allocate",
        formatter_class=_Formatter,
        help="allocate the target sparsity and save the sparse model",
        description="Allocate the global target sparsity over the prunable layers with a method from "
        f"the registry ({METHODS_HELP}) and write DIR/model.safetensors (the whole state_dict under "
        "the model's own parameter names) and DIR/manifest.json (target, achieved_sparsity, zeros, "
        "prunable, method, score, per-layer figures). Give a --calibration folder, or --model (and "
        "--data) to calibrate on the fly.",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        default=None,
        help="a folder written by `fcpts calibrate` (else --model/--data are calibrated first)",
    )
    _add_sources(p, model_required=False)
    _add_calibration(
        p,
        score_help="importance score: magnitude or wanda (default: the calibration's; "
        "auto, i.e. wanda, when calibrating on the fly)",
    )
    _add_allocator(p, target_default=None)
    _add_selection(p)
    p.add_argument(
        "--out", metavar="DIR", default=None, help="sparse model folder to write (required)"
    )
    _add_common(p)

    p = sub.add_parser(
        "evaluate",
        formatter_class=_Formatter,
        help="compare the sparse model with the dense one",
        description="Compare the sparse model with the dense one on held-out data disjoint from the "
        "calibration data: the task metric, the sparsity counted from the weights, size on disk "
        "(dense safetensors vs bitmask+values safetensors) and CPU latency. Writes DIR/metrics.json, "
        "DIR/allocation.png, DIR/report.md and DIR/report.html.",
    )
    _add_sources(p)
    p.add_argument(
        "--sparse",
        metavar="DIR",
        default=None,
        help="the --out folder of `fcpts allocate` (required)",
    )
    _add_evaluation(p, samples_alias=True)
    g = p.add_argument_group("approval gate")
    g.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="X",
        help="also record the approval gate's decision for this allowed quality drop",
    )
    p.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for metrics.json and the reports (required)",
    )
    _add_common(p)

    p = sub.add_parser(
        "register",
        formatter_class=_Formatter,
        help="apply the approval gate and record the decision",
        description="Approve the sparse model if its quality drop versus dense is within --tolerance and "
        "its sparsity counted from the weights is exactly the target; write DIR/decision.json with the "
        "reasons; hand an approved model to --registry.",
    )
    p.add_argument(
        "--metrics",
        metavar="PATH",
        default=None,
        help="metrics.json, or the --out folder of `fcpts evaluate` (required)",
    )
    p.add_argument(
        "--sparse",
        metavar="DIR",
        default=None,
        help="the --out folder of `fcpts allocate` (required)",
    )
    _add_gate(p, required=True)
    p.add_argument("--out", metavar="DIR", default=None, help="folder for decision.json (required)")
    _add_common(p)

    p = sub.add_parser(
        "run",
        formatter_class=_Formatter,
        help="run the whole pipeline with the KFP local runner",
        description="Run the sparsify pipeline (calibrate -> allocate -> evaluate -> register if "
        "approved) with Kubeflow Pipelines' local SubprocessRunner in this Python environment, then "
        "print the summary and each step's wall time. Defaults: the MiniLM demo at global sparsity "
        f"{RUN_DEFAULT_TARGET:g}. Artifacts land under --root/<run>/<step>/; the full log in "
        "<run>/pipeline.log.",
    )
    _add_sources(p)
    _add_calibration(p)
    _add_allocator(p, target_default=RUN_DEFAULT_TARGET)
    _add_selection(p)
    _add_evaluation(p, samples_alias=False)
    _add_gate(p, required=True)
    g = p.add_argument_group("runner")
    g.add_argument(
        "--root",
        metavar="DIR",
        default=None,
        help=f"local pipeline root (default: ./{DEFAULT_ROOT})",
    )
    g.add_argument(
        "--cache",
        action="store_true",
        default=None,
        help="reuse cached step outputs (KFP local caching; calibrate and allocate only)",
    )
    g.add_argument(
        "--verbose", action="store_true", default=None, help="stream the full KFP log to stdout"
    )
    _add_common(p)

    p = sub.add_parser(
        "compile",
        formatter_class=_Formatter,
        help="write the pipeline as KFP v2 YAML",
        description="Compile pipelines/sparsify.py into a KFP v2 pipeline YAML for a cluster.",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help=f"YAML file to write (default: {DEFAULT_PIPELINE_FILE})",
    )
    p.add_argument(
        "--config", metavar="FILE", help="YAML or JSON file of options (only 'out' applies)"
    )
    return parser


# ----------------------------------------------------------------------------- config


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
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
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


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _require(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name, None) in (None, ""):
            raise UserError(f"--{name.replace('_', '-')} is required for `{PROG} {args.command}`")


def _split_patterns(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [p.strip() for v in values for p in str(v).split(",") if p.strip()]


def selection_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The layer-selection fields the user gave (the rest keep the source's defaults)."""
    out: dict[str, Any] = {}
    for key in ("include", "exclude", "keep_dense"):
        patterns = _split_patterns(getattr(args, key, None))
        if patterns is not None:
            out[key] = patterns
    if getattr(args, "bounds", None):
        bounds = {}
        for item in args.bounds:
            pattern, eq, span = str(item).rpartition("=")
            lo, colon, hi = span.partition(":")
            if not eq or not pattern or not colon:
                raise UserError(
                    f"--bounds takes PATTERN=MIN:MAX (e.g. 'classifier.*=0:0.5'), got {item!r}"
                )
            try:
                bounds[pattern] = [float(lo), float(hi)]
            except ValueError:
                raise UserError(f"--bounds {item!r}: MIN and MAX must be numbers") from None
        out["bounds"] = bounds
    for key in ("min_sparsity", "max_sparsity"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except Exception:
        return text


def allocator_settings(
    args: argparse.Namespace, default_iters: int | None = None
) -> dict[str, Any]:
    settings = dict(getattr(args, "settings", None) or {})
    for item in getattr(args, "settings_flags", None) or []:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set takes KEY=VALUE (e.g. --set schedule=cosine), got {item!r}")
        settings[key.strip()] = _parse_value(value.strip())
    if getattr(args, "iters", None) is not None:
        settings["iters"] = args.iters
    if getattr(args, "lam", None) is not None:
        settings["lam"] = args.lam
    if getattr(args, "joint", None) is not None:
        settings["joint"] = args.joint
    method = _get(args, "method", "fcpts")
    if default_iters is not None and method == "fcpts":
        settings.setdefault("iters", default_iters)
    return settings


def _sources(args: argparse.Namespace):
    from .sources import Sources

    return Sources(
        model=args.model,
        data=args.data,
        weights=args.weights,
        task=_get(args, "task", "auto"),
        image_size=args.image_size,
        image_mode=_get(args, "image_mode", "RGB"),
    )


def _progress_enabled(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", None) and sys.stderr.isatty()


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- commands


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .steps import calibrate

    _require(args, "model", "out")
    _check_positive(args, "calibration_samples", "batch_size", "image_size")
    cal = calibrate(
        _sources(args),
        args.out,
        score=_get(args, "score", "auto"),
        samples=args.calibration_samples,
        batch_size=args.batch_size,
        seed=_get(args, "seed", 0),
        selection=selection_overrides(args) or None,
        device=_get(args, "device", "auto"),
        progress_bar=_progress_enabled(args),
    )
    info = cal.info
    norms = info["input_norm_layers"]
    print(
        f"calibrated {info['model']['source']} on {info['samples']} samples of {info['data']['source']} "
        f"({info['batches']} batches of up to {info['batch_size']}, task {info['task']}, score {info['score']}"
        + (f", input statistics for {len(norms)} layers" if norms else "")
        + f") in {info['step_seconds']:.1f} s\nwrote {cal.path}"
    )
    return 0


def cmd_allocate(args: argparse.Namespace) -> int:
    from . import report
    from .steps import allocate, calibrate

    _require(args, "target", "out")
    _check_positive(args, "calibration_samples", "batch_size", "image_size", "iters")
    settings = allocator_settings(args)
    common = {
        "target": args.target,
        "method": _get(args, "method", "fcpts"),
        "settings": settings,
        "seed": _get(args, "seed", 0),
        "device": _get(args, "device", "auto"),
        "recalibrate_bn": bool(args.recalibrate_bn),
        "progress_bar": _progress_enabled(args),
    }
    selection = selection_overrides(args) or None
    _check_allocation_options(common["target"], common["method"], settings, args.score)
    if args.calibration:
        if args.data:
            raise UserError(
                "--data is not used with --calibration: the calibration folder holds the data"
            )
        resolved = None
        if args.model:
            from .sources import resolve_model

            resolved = resolve_model(args.model, args.weights)
        result = allocate(
            args.calibration,
            args.out,
            score=args.score,
            selection=selection,
            resolved=resolved,
            **common,
        )
    else:
        _require(args, "model")
        from .sources import resolve_model

        resolved = resolve_model(args.model, args.weights)
        with tempfile.TemporaryDirectory(prefix="fcpts-calibration-") as tmp:
            cal = calibrate(
                _sources(args),
                tmp,
                score=_get(args, "score", "auto"),
                samples=args.calibration_samples,
                batch_size=args.batch_size,
                seed=common["seed"],
                selection=selection,
                device=common["device"],
                progress_bar=common["progress_bar"],
                resolved=resolved,
            )
            result = allocate(cal, args.out, resolved=resolved, **common)
    m = result.manifest
    notes = []
    if m.get("history"):
        last = m["history"][-1]
        notes.append(
            f"final reconstruction loss on the calibration data {last.get('rec_loss', float('nan')):.4f} "
            "(evaluate for held-out quality vs dense)"
        )
    print(report.summary(manifest=m, notes=notes))
    print(f"wrote {result.path}/model.safetensors and manifest.json")
    return 0


def _check_allocation_options(
    target: Any, method: str, settings: Mapping[str, Any], score: str | None
) -> None:
    from .alloc import get_allocator
    from .landing import check_target
    from .scores import check_score

    check_target(target)
    get_allocator(method, **settings)  # unknown method or setting: a UserError naming the choices
    if score not in (None, "auto"):
        check_score(score)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import report
    from .sparse_model import read_manifest
    from .steps import evaluate

    _require(args, "model", "sparse", "out")
    _check_positive(args, "evaluation_samples", "eval_batch_size", "image_size")
    tolerance = args.tolerance
    if tolerance is not None:
        from .steps.register import check_tolerance

        tolerance = check_tolerance(tolerance)
    result = evaluate(
        _sources(args),
        args.sparse,
        args.out,
        samples=args.evaluation_samples,
        batch_size=args.eval_batch_size,
        seed=args.seed,
        device=_get(args, "device", "auto"),
        tolerance=tolerance,
        latency_seconds=_get(args, "latency_seconds", 1.0),
        progress_bar=_progress_enabled(args),
    )
    manifest = read_manifest(args.sparse)
    print(
        report.summary(
            manifest=manifest, metrics=result.metrics, decision=result.metrics.get("gate")
        )
    )
    print(f"wrote {result.path}/metrics.json, allocation.png, report.md, report.html")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from . import report
    from .steps import register

    _require(args, "metrics", "sparse", "out")
    result = register(
        args.metrics,
        args.sparse,
        args.out,
        tolerance=_get(args, "tolerance", DEFAULT_TOLERANCE),
        registry=args.registry,
        name=args.name,
    )
    print(report.summary(decision=result.record))
    print(f"wrote {result.path}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    module = load_pipeline_module()
    out = Path(_get(args, "out", DEFAULT_PIPELINE_FILE))
    if out.parent and not out.parent.exists():
        raise UserError(f"folder {out.parent} does not exist")
    compiler.Compiler().compile(module.sparsify_pipeline, str(out))
    from components import IMAGE

    print(
        f"wrote {out}: pipeline {module.PIPELINE_NAME} (calibrate -> allocate -> evaluate -> register if "
        f"approved), image {IMAGE}"
    )
    return 0


# ----------------------------------------------------------------------------- pipeline


def project_root() -> Path:
    """The checkout holding components/ and pipelines/ (they are not part of the wheel)."""
    candidates = []
    if os.environ.get("FCPTS_PROJECT_ROOT"):
        candidates.append(Path(os.environ["FCPTS_PROJECT_ROOT"]))
    candidates.append(Path(__file__).resolve().parents[2])  # src/fcpts/cli.py -> checkout
    candidates.append(Path.cwd())
    for root in candidates:
        if (root / "pipelines" / "sparsify.py").is_file() and (
            root / "components" / "__init__.py"
        ).is_file():
            return root.resolve()
    raise UserError(
        "cannot find pipelines/sparsify.py and components/: run from the fcpts checkout "
        "or set FCPTS_PROJECT_ROOT to it"
    )


def load_pipeline_module():
    """Import pipelines.sparsify from the checkout (components/ and pipelines/ are packages)."""
    import importlib

    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module("pipelines.sparsify")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_STARTED = re.compile(r"Executing task '([\w.-]+)'")
_FINISHED = re.compile(r"Task '([\w.-]+)' finished with status (\w+)")
_CACHED = re.compile(r"Task ([\w.-]+) cache hit")
_ERROR = re.compile(r"fcpts\.errors\.(UserError|ServiceError|FcptsError): (.+)$")


class _PipelineLog:
    """Stands in for sys.stdout while the local runner runs: writes everything to the log
    file, times each step from its start and finish lines, relays fcpts progress lines."""

    def __init__(self, path: Path, verbose: bool, real_stdout) -> None:
        self.path = path
        self.file = open(path, "w", buffering=1)  # noqa: SIM115 (closed in close())
        self.verbose = verbose
        self.real = real_stdout
        self.buffer = ""
        self.started: dict[str, float] = {}
        self.finished: dict[str, tuple[float, str]] = {}
        self.cached: set[str] = set()
        self.errors: list[tuple[str, str]] = []
        self.current: str | None = None

    def write(self, text: str) -> int:
        self.file.write(text)
        if self.verbose:
            self.real.write(text)
        self.buffer += text
        while "\n" in self.buffer:
            line, self.buffer = self.buffer.split("\n", 1)
            self._line(_ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.file.flush()
        if self.verbose:
            self.real.flush()

    def isatty(self) -> bool:
        return False

    def _label(self, task: str) -> str:
        index = PIPELINE_STEPS.index(task) + 1 if task in PIPELINE_STEPS else "?"
        return f"[{index}/{len(PIPELINE_STEPS)}] {task}"

    def _line(self, line: str) -> None:
        now = time.perf_counter()
        if m := _STARTED.search(line):
            self.started[m[1]] = now
            self.current = m[1]
            if not self.verbose:
                _say(f"{self._label(m[1])} ...")
        elif m := _FINISHED.search(line):
            self.finished[m[1]] = (now, m[2])
            if not self.verbose:
                took = now - self.started.get(m[1], now)
                verdict = "done" if m[2] == "SUCCESS" else "FAILED"
                _say(f"{self._label(m[1])} {verdict} in {took:.1f} s")
        elif m := _CACHED.search(line):
            self.cached.add(m[1])
            if not self.verbose:
                _say(f"{self._label(m[1])} cached (outputs of an earlier run reused)")
        elif "[fcpts]" in line and not self.verbose:
            _say("      " + line.split("[fcpts]", 1)[1].strip())
        if m := _ERROR.search(line):
            self.errors.append((m[1], m[2].strip()))

    def seconds(self, task: str) -> float | None:
        if task in self.started and task in self.finished:
            return self.finished[task][0] - self.started[task]
        return None

    def close(self) -> None:
        if self.buffer:
            self._line(_ANSI.sub("", self.buffer))
            self.buffer = ""
        self.file.close()


def _preflight(args: argparse.Namespace, settings: Mapping[str, Any]) -> None:
    """Check the options before starting the pipeline (a bad input fails in a second,
    with exit code 2, instead of inside a step)."""
    from .demos import DEMOS
    from .sources import _FUNCTION_SPEC, DEMO_PREFIX
    from .steps.common import selection_from_dict
    from .steps.register import check_tolerance, load_registry

    sources = _sources(args)
    src = sources.model.strip()
    if src.startswith(DEMO_PREFIX):
        if src.removeprefix(DEMO_PREFIX) not in DEMOS:
            raise UserError(
                f"unknown demo {src!r}: choose one of {', '.join(DEMO_PREFIX + k for k in DEMOS)}"
            )
    elif not Path(src).expanduser().exists():
        if not _FUNCTION_SPEC.match(src):
            raise UserError(
                f"unknown model source {src!r}: give demo:minilm, demo:digits-cnn, a Hugging Face folder, "
                "a TorchScript file, or module:function with --weights"
            )
        if sources.weights and not Path(sources.weights).expanduser().is_file():
            raise UserError(f"weights file {sources.weights} does not exist")
    if (
        sources.data
        and not sources.data.startswith(DEMO_PREFIX)
        and not Path(sources.data).expanduser().exists()
    ):
        raise UserError(f"data file or folder {sources.data} does not exist")
    _check_allocation_options(args.target, _get(args, "method", "fcpts"), settings, args.score)
    check_tolerance(_get(args, "tolerance", DEFAULT_TOLERANCE))
    selection_from_dict(selection_overrides(args))
    load_registry(args.registry)
    _check_positive(
        args,
        "calibration_samples",
        "batch_size",
        "evaluation_samples",
        "eval_batch_size",
        "image_size",
    )


def cmd_run(args: argparse.Namespace) -> int:
    import warnings

    from . import report

    command_start = time.perf_counter()
    args.model = args.model or "demo:minilm"
    args.target = RUN_DEFAULT_TARGET if args.target is None else args.target
    settings = allocator_settings(args, default_iters=RUN_DEFAULT_ITERS)
    _preflight(args, settings)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    module = load_pipeline_module()
    from kfp import local

    root = Path(_get(args, "root", DEFAULT_ROOT)).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    arguments = {
        "model": args.model,
        "data": args.data or "",
        "weights": args.weights or "",
        "task": _get(args, "task", "auto"),
        "target": float(args.target),
        "method": _get(args, "method", "fcpts"),
        "score": _get(args, "score", "auto"),
        "settings": json.dumps(settings),
        "selection": json.dumps(selection_overrides(args)) if selection_overrides(args) else "",
        "calibration_samples": args.calibration_samples or 0,
        "batch_size": args.batch_size or 0,
        "evaluation_samples": args.evaluation_samples or 0,
        "eval_batch_size": args.eval_batch_size or 0,
        "seed": _get(args, "seed", 0),
        "recalibrate_bn": bool(args.recalibrate_bn),
        "tolerance": float(_get(args, "tolerance", DEFAULT_TOLERANCE)),
        "registry": args.registry or "",
        "name": args.name or "",
        "image_size": args.image_size or 0,
        "image_mode": _get(args, "image_mode", "RGB"),
        "device": _get(args, "device", "auto"),
    }
    pipeline = module.build(retries=False)
    iters = settings.get("iters")
    _say(
        f"{PROG} run: pipeline {module.PIPELINE_NAME} on the KFP local runner (SubprocessRunner, this Python), "
        f"{args.model} at target {args.target:g} with {arguments['method']}"
        + (f" ({iters} iterations)" if iters is not None else "")
        + f"; artifacts under {root}"
    )
    log_path = root / f".{module.PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = _PipelineLog(log_path, bool(args.verbose), sys.stdout)
    real_stdout = sys.stdout
    pipeline_start = time.perf_counter()
    failure: BaseException | None = None
    outputs = None
    with (
        tempfile.TemporaryDirectory(prefix="fcpts-kfp-workspace-") as workspace,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*non-Python base image.*")
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        local.init(
            runner=local.SubprocessRunner(use_venv=False),
            pipeline_root=str(root),
            workspace_root=workspace,
            raise_on_error=True,
            enable_caching=bool(args.cache),
        )
        sys.stdout = log
        try:
            outputs = pipeline(**arguments).outputs
        except Exception as exc:  # the local runner raises RuntimeError when a step fails
            failure = exc
        finally:
            sys.stdout = real_stdout
            log.close()
    pipeline_seconds = time.perf_counter() - pipeline_start

    if failure is not None or outputs is None:
        failed = [t for t, (_, status) in log.finished.items() if status != "SUCCESS"] or [
            log.current or "?"
        ]
        where = f"pipeline step {failed[0]} failed"
        if log.errors:
            kind, message = log.errors[-1]
            error = UserError if kind == "UserError" else FcptsError
            raise error(f"{where}: {message} (log: {log_path})")
        raise FcptsError(
            f"{where}: {str(failure).splitlines()[0] if failure else 'no outputs'} (log: {log_path})"
        )

    sparse_dir = Path(outputs["sparse_model"].path)
    evaluation_dir = Path(outputs["evaluation"].path)
    run_dir = Path(outputs["evaluation"].path).parent.parent
    final_log = run_dir / "pipeline.log"
    try:
        os.replace(log_path, final_log)
    except OSError:
        final_log = log_path
    manifest = json.loads((sparse_dir / "manifest.json").read_text())
    metrics = json.loads((evaluation_dir / "metrics.json").read_text())
    decision_file = run_dir / "register" / "decision" / "decision.json"
    if decision_file.is_file():
        decision = json.loads(decision_file.read_text())
    else:
        decision = dict(
            metrics["gate"],
            registration={"status": "register step skipped: the gate rejected the model"},
        )
    timings: list[tuple[str, float | None, str]] = []
    for step in PIPELINE_STEPS:
        note = "cached" if step in log.cached else ""
        if step == "register" and step not in log.started:
            note = "skipped: the gate did not approve"
        timings.append((step, log.seconds(step), note))
    timings.append(("total", pipeline_seconds, ""))
    notes = [
        f"step wall times are measured by `{PROG} run` from each step's start to its end "
        "(a fresh Python process: imports, model loading and the work); total is the whole pipeline",
    ]
    if arguments["method"] == "fcpts":
        lib_iters = 200
        used = settings.get("iters", lib_iters)
        if used != lib_iters:
            notes.append(
                f"fcpts ran {used} iterations, not the library default {lib_iters}, to keep `run` short"
            )
    print(
        report.summary(
            manifest=manifest, metrics=metrics, decision=decision, timings=timings, notes=notes
        )
    )
    print(f"artifacts: {run_dir}  (report: {evaluation_dir / 'report.html'}; log: {final_log})")
    print(f"{PROG} run finished in {time.perf_counter() - command_start:.1f} s")
    return 0


COMMANDS = {
    "calibrate": cmd_calibrate,
    "allocate": cmd_allocate,
    "evaluate": cmd_evaluate,
    "register": cmd_register,
    "run": cmd_run,
    "compile": cmd_compile,
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "error"


def main(argv: Sequence[str] | None = None) -> int:
    # OpenMP threads that sleep instead of spinning while they wait: on a shared or
    # CPU-limited machine (a busy laptop, a pod with a CPU limit) spinning threads of
    # several processes starve each other, and torch on 2 busy cores ran fcpts 3-5x
    # slower. Costs little on an idle machine; export OMP_WAIT_POLICY=ACTIVE to opt out.
    # Takes effect because no command has imported torch yet (the steps inherit it).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        apply_config(args, parser)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except FcptsError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("FCPTS_DEBUG"):
            traceback.print_exc()
        print(
            f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)} (set FCPTS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
