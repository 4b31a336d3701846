"""``fcpts sweep``: the argparse wiring of :func:`fcpts.sweep.run_sweep`.

:mod:`fcpts.cli` adds the command with :func:`add_parser` and :func:`run`. The options it
shares with the steps (sources, target, sample counts, device, seed, tracking) are derived
from their declarations (:mod:`fcpts.cli.derive`); the sweep's own are written here.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import UserError
from ..sources import Sources
from ..steps.options import (
    AllocationOptions,
    CalibrationOptions,
    EvaluationOptions,
    RunOptions,
    TrackingOptions,
)
from .common import allocator_settings, get_option
from .derive import add_group, given
from .options import add_set

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
    from ..sweep.space import default_bounds

    parts = []
    for name, bounds in default_bounds().items():
        if name == "score":
            parts.append(f"score={','.join(bounds)}")
        else:
            parts.append(f"{name}={bounds[0]:g}:{bounds[1]:g}")
    return " ".join(parts)


def configure(p: argparse.ArgumentParser) -> None:
    add_group(
        p,
        Sources,
        "model and data",
        "Trials learn on the calibration third of the data and are scored on the validation "
        "third; TorchScript models cannot be swept (fcpts learns through the forward pass).",
        required=("model",),
    )
    g = add_group(p, AllocationOptions, "sweep", only=("target",), required=("target",))
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
    add_set(
        g,
        "fix another fcpts setting for every trial, e.g. --set schedule=constant "
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

    g = add_group(p, CalibrationOptions, "samples", only=("calibration_samples", "batch_size"))
    g.add_argument(
        "--validation-samples",
        type=int,
        default=None,
        metavar="N",
        help="validation samples each trial is scored on (default: the source's evaluation count)",
    )
    g.add_argument(
        "--selection",
        metavar="JSON",
        default=None,
        help='layer selection as JSON, e.g. \'{"exclude": ["classifier.*"]}\' (fields: '
        "include, exclude, keep_dense, bounds, min_sparsity, max_sparsity)",
    )

    add_group(
        p,
        EvaluationOptions,
        "validation",
        only=("eval_batch_size",),
        helps={"eval_batch_size": "validation batch size"},
        shown_defaults={"eval_batch_size": "64"},
    )
    g = add_group(
        p,
        TrackingOptions,
        "tracking and output",
        "One MLflow parent run per study and a nested run per trial (no tracking URI and no "
        "$MLFLOW_TRACKING_URI: no MLflow).",
        only=("tracking_uri", "experiment"),
        shown_defaults={"experiment": "fcpts-sweep"},
    )
    g.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="folder for best.json, allocate.json, trials.json, study.png (required)",
    )

    g = add_group(p, RunOptions, "general")
    g.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (long option names; flags override the file)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per worker (default: CPU cores / workers for K > 1)",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no per-trial log lines")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """The fcpts settings every trial fixes: the config's ``settings`` and ``--set`` items
    (the searched ones come from --space)."""
    return allocator_settings(args, flags=False)


def run(args: argparse.Namespace) -> int:
    """Run ``fcpts sweep`` from parsed arguments; returns the exit code."""
    from .. import sweep

    for name in ("model", "target", "trials", "out"):
        if getattr(args, name, None) in (None, ""):
            raise UserError(f"--{name} is required for `fcpts sweep`")
    if args.trials < 0:
        raise UserError(f"--trials must be >= 0, got {args.trials}")
    selection = None
    if getattr(args, "selection", None):
        from ..steps.common import selection_from_json

        selection_from_json(args.selection)  # a UserError names a bad field
        selection = json.loads(args.selection)  # only the fields given: the rest stay the source's
    grace = int(get_option(args, "grace", sweep.DEFAULT_GRACE))
    if grace < 4:
        raise UserError(f"--grace must be >= 4 seconds, got {grace}")
    if getattr(args, "quiet", None):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    spec = sweep.SweepSpec(
        sources=Sources(**given(args, Sources)),
        target=args.target,
        seed=get_option(args, "seed", 0),
        calibration_samples=args.calibration_samples,
        batch_size=args.batch_size,
        validation_samples=args.validation_samples,
        eval_batch_size=args.eval_batch_size,
        selection=selection or {},
        settings=_settings(args),
        space=sweep.SearchSpace.from_overrides(args.space).to_dict(),
        report_every=get_option(args, "report_every", 20),
    )
    result = sweep.run_sweep(
        spec,
        args.trials,
        storage=args.storage,
        study_name=args.study,
        workers=get_option(args, "workers", 1),
        out_dir=args.out,
        tracking_uri=args.tracking_uri,
        pruner_startup_trials=get_option(args, "pruner_startup", 3),
        pruner_warmup_steps=args.pruner_warmup,
        baseline=get_option(args, "baseline", True),
        device=get_option(args, "device", "auto"),
        threads=args.threads,
        experiment=get_option(args, "experiment", sweep.DEFAULT_EXPERIMENT),
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
