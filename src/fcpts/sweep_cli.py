"""``fcpts sweep``: the argparse wiring of :func:`fcpts.sweep.run_sweep`.

:mod:`fcpts.cli` adds the command with :func:`add_parser` and :func:`run`. Also runnable on
its own as ``python -m fcpts.sweep_cli sweep --model ...`` (or without the word ``sweep``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from .errors import FcptsError, UserError

COMMAND = "sweep"
DESCRIPTION = """\
Search the fcpts settings that are declared with a search range (see --space) and the
score (magnitude or wanda), with Optuna for one model, target and data source. Each
trial allocates on the calibration split and is scored on the validation split (top-1 for
classifiers, mean cosine to the dense embeddings for encoders, minus the relative output
MSE otherwise; higher is better), disjoint from the calibration split and from the
evaluation split that `fcpts evaluate` reports on. Trials that miss the exact target are
infeasible and never chosen; hopeless trials are pruned on their reconstruction loss. The
first trial of a new study runs the default settings (the baseline).

Writes DIR/best.json (value, params = the fcpts settings dict, score, trial, baseline value,
trial counts), DIR/allocate.json (options for `fcpts allocate --config DIR/allocate.json
--out SPARSE`), DIR/trials.json and DIR/study.png (history and parameter importances).

Storage: DIR/study.db (SQLite) by default, or --storage with a SQLAlchemy URL such as
postgresql+psycopg2://user:password@host/db to share one study between workers on several
machines (each runs `fcpts sweep` with the same --storage and --study). Rerunning with the
same storage and study resumes it: --trials more trials, numbers continue, and a trial left
RUNNING by a killed worker is marked FAIL (after the heartbeat grace period) and re-queued.
"""
EPILOG = """\
examples:
  fcpts sweep --model demo:digits-cnn --target 0.7 --trials 30 --out sweep/
  fcpts sweep --model demo:digits-cnn --target 0.7 --trials 40 --workers 4 --out sweep/ \\
      --storage postgresql+psycopg2://fcpts@db.internal/sweeps --study digits-0.7
  fcpts allocate --config sweep/allocate.json --out sparse/
"""


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32, width=100)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``sweep`` command to ``subparsers`` (an argparse sub-parsers action)."""
    p = subparsers.add_parser(
        COMMAND,
        formatter_class=_formatter,
        help="search the fcpts settings with Optuna (best.json for allocate)",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    configure(p)
    return p


def _space_defaults() -> str:
    """The declared search ranges, as --space would write them."""
    from .sweep.space import default_bounds

    parts = []
    for name, bounds in default_bounds().items():
        if name == "score":
            parts.append(f"score={','.join(bounds)}")
        else:
            parts.append(f"{name}={bounds[0]:g}:{bounds[1]:g}")
    return " ".join(parts)


def configure(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument(
        "--model",
        metavar="SRC",
        default=None,
        help="model source: demo:minilm, demo:digits-cnn, a Hugging Face folder, or "
        "module:function with --weights (required; TorchScript cannot be swept: fcpts learns "
        "through the forward pass)",
    )
    g.add_argument("--weights", metavar="FILE", default=None, help="weights for module:function")
    g.add_argument(
        "--data",
        metavar="SRC",
        default=None,
        help="data source (text file, ImageFolder folder, tensors); optional for the demos. "
        "Trials learn on the calibration third and are scored on the validation third",
    )
    g.add_argument(
        "--task",
        choices=("auto", "classifier", "encoder", "regression"),
        default=None,
        help="how to run and score the model (default: auto)",
    )
    g.add_argument(
        "--image-size", type=int, default=None, metavar="N", help="resize images to N x N"
    )
    g.add_argument("--image-mode", choices=("RGB", "L"), default=None, help="image colour mode")

    g = p.add_argument_group("sweep")
    g.add_argument(
        "--target",
        type=float,
        default=None,
        metavar="S",
        help="global sparsity, strictly between 0 and 1 (required)",
    )
    g.add_argument(
        "--trials",
        type=int,
        default=None,
        metavar="N",
        help="trials to run now (on resume: N more), shared by the workers (required)",
    )
    g.add_argument(
        "--storage",
        metavar="URL",
        default=None,
        help="Optuna storage: a SQLAlchemy URL (postgresql+psycopg2://user:pw@host/db for workers "
        "on several machines; sqlite:///path.db) or a SQLite file path (default: DIR/study.db)",
    )
    g.add_argument(
        "--study",
        metavar="NAME",
        default=None,
        help="study name; the same storage and name resume a study "
        "(default: fcpts-<model>-t<target>)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="K",
        help="worker processes on this machine sharing the study (default: 1). K > 1 needs a "
        "database storage: the default SQLite file works for a few local workers; use "
        "PostgreSQL for many workers or several machines",
    )
    g.add_argument(
        "--space",
        action="append",
        default=None,
        metavar="NAME=LO:HI",
        help="search range, repeatable: floats on a log scale, integers uniformly, score a comma "
        "list; LO:LO fixes a setting (defaults: " + _space_defaults() + ")",
    )
    g.add_argument(
        "--set",
        dest="settings_flags",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="fix another fcpts setting for every trial, e.g. --set schedule=constant "
        "(config file: a 'settings' mapping)",
    )
    g.add_argument(
        "--report-every",
        type=int,
        default=None,
        metavar="N",
        help="report the reconstruction loss to the pruner every N iterations of the shortest "
        "searched run; longer runs report at the same fractions of their length (default: 20)",
    )
    g.add_argument(
        "--pruner-startup",
        type=int,
        default=None,
        metavar="N",
        help="no pruning until N trials have finished (default: 3)",
    )
    g.add_argument(
        "--pruner-warmup",
        type=int,
        default=None,
        metavar="STEPS",
        help="no pruning before this checkpoint, in iterations of the shortest searched run "
        "(default: 2 x --report-every)",
    )
    g.add_argument(
        "--no-baseline",
        dest="baseline",
        action="store_false",
        default=None,
        help="do not enqueue the default settings as the first trial of a new study",
    )
    g.add_argument(
        "--grace",
        type=int,
        default=None,
        metavar="SECONDS",
        help="a RUNNING trial without a heartbeat for this long belongs to a dead worker and "
        "is marked FAIL and re-queued (default: 60; heartbeats every quarter of it)",
    )

    g = p.add_argument_group("samples")
    g.add_argument(
        "--calibration-samples",
        type=int,
        default=None,
        metavar="N",
        help="calibration samples each trial learns on (default: the source's)",
    )
    g.add_argument(
        "--batch-size", type=int, default=None, metavar="N", help="calibration batch size"
    )
    g.add_argument(
        "--validation-samples",
        type=int,
        default=None,
        metavar="N",
        help="validation samples each trial is scored on (default: the source's evaluation count)",
    )
    g.add_argument(
        "--eval-batch-size", type=int, default=None, metavar="N", help="validation batch size"
    )
    g.add_argument(
        "--selection",
        metavar="JSON",
        default=None,
        help='layer selection as JSON, e.g. \'{"exclude": ["classifier.*"]}\' (fields: '
        "include, exclude, keep_dense, bounds, min_sparsity, max_sparsity)",
    )

    g = p.add_argument_group("tracking and output")
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking URI: one parent run per study, a nested run per trial "
        "(default: $MLFLOW_TRACKING_URI; none: no MLflow)",
    )
    g.add_argument(
        "--experiment",
        metavar="NAME",
        default=None,
        help="MLflow experiment (default: fcpts-sweep)",
    )
    g.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for best.json, allocate.json, trials.json, study.png (required)",
    )

    g = p.add_argument_group("general")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (long option names; flags override the file)",
    )
    g.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default=None, help="where to compute"
    )
    g.add_argument("--seed", type=int, default=None, metavar="N", help="seed (default: 0)")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per worker (default: CPU cores / workers for K > 1)",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no per-trial log lines")


def _get(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    value = getattr(args, name, None)
    return default if value is None else value


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        return text


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(getattr(args, "settings", None) or {})
    for item in getattr(args, "settings_flags", None) or []:
        key, eq, value = str(item).partition("=")
        if not eq or not key.strip():
            raise UserError(f"--set takes KEY=VALUE (e.g. --set schedule=constant), got {item!r}")
        settings[key.strip()] = _parse_value(value.strip())
    return settings


def run(args: argparse.Namespace) -> int:
    """Run ``fcpts sweep`` from parsed arguments; returns the exit code."""
    from . import sweep

    for name in ("model", "target", "trials", "out"):
        if getattr(args, name, None) in (None, ""):
            raise UserError(f"--{name} is required for `fcpts sweep`")
    if args.trials < 0:
        raise UserError(f"--trials must be >= 0, got {args.trials}")
    selection = None
    if getattr(args, "selection", None):
        from .steps.common import selection_from_json

        selection_from_json(args.selection)  # a UserError names a bad field
        selection = json.loads(args.selection)  # only the fields given: the rest stay the source's
    grace = int(_get(args, "grace", sweep.DEFAULT_GRACE))
    if grace < 4:
        raise UserError(f"--grace must be >= 4 seconds, got {grace}")
    if getattr(args, "quiet", None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = sweep.run_sweep(
        args.model,
        args.data,
        args.target,
        args.trials,
        storage=args.storage,
        study_name=args.study,
        workers=_get(args, "workers", 1),
        out_dir=args.out,
        seed=_get(args, "seed", 0),
        tracking_uri=args.tracking_uri,
        weights=args.weights,
        task=_get(args, "task", "auto"),
        image_size=args.image_size,
        image_mode=_get(args, "image_mode", "RGB"),
        space=args.space,
        settings=_settings(args),
        selection=selection,
        calibration_samples=args.calibration_samples,
        batch_size=args.batch_size,
        validation_samples=args.validation_samples,
        eval_batch_size=args.eval_batch_size,
        report_every=_get(args, "report_every", 20),
        pruner_startup_trials=_get(args, "pruner_startup", 3),
        pruner_warmup_steps=args.pruner_warmup,
        baseline=_get(args, "baseline", True),
        device=_get(args, "device", "auto"),
        threads=args.threads,
        experiment=_get(args, "experiment", sweep.DEFAULT_EXPERIMENT),
        heartbeat_interval=max(1, grace // 4),
        grace_period=grace,
    )
    print(summary(result.best, result.path))
    return 0


def summary(best: dict[str, Any], path: Any) -> str:
    t = best["trials"]
    dense = best.get("dense_value")
    lines = [
        f"study {best['study']} ({best['storage']}): {t['total']} trials, {t['complete']} complete, "
        f"{t['pruned']} pruned, {t['fail']} failed, {t['infeasible']} off target",
        f"best: trial {best['trial']}, validation {best['metric']} {best['value']:.4f}"
        + (f" (dense {dense:.4f})" if dense is not None else ""),
    ]
    base = best.get("baseline") or {}
    if base.get("value") is not None:
        lines.append(
            f"baseline (default settings, trial {base['trial']}): {base['value']:.4f}; "
            f"improvement {best['value'] - base['value']:+.4f}"
        )
    settings = ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()
    )
    lines.append(f"score {best['score']}; settings {settings}")
    out = os.path.dirname(str(path)) or "."
    lines.append(
        f"wrote {path}; allocate with: fcpts allocate --config {os.path.join(out, 'allocate.json')} --out SPARSE"
    )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fcpts", formatter_class=_formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fcpts.sweep_cli [sweep] --model ...``: the command on its own."""
    # as `fcpts` does: idle OpenMP threads sleep instead of spinning (busy machines)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != COMMAND:
        argv.insert(0, COMMAND)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.settings = {}
        if getattr(args, "config", None):
            from .cli import apply_config

            apply_config(args, parser)
        return run(args)
    except UserError as exc:
        print(f"fcpts: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except FcptsError as exc:
        print(f"fcpts: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fcpts: interrupted (rerun the same command to resume the study)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
