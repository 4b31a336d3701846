"""The ``fcpts`` command line: calibrate, allocate, evaluate, register, run, compile, sweep,
promote, rollback, submit.

Exit codes: 0 success; 2 a mistake the user can fix (bad option, missing or malformed
input, impossible target); 1 anything else. Errors are one line on stderr
(``fcpts: error: ...``); set FCPTS_DEBUG=1 to see the traceback of an unexpected error.
"""

import argparse
import os
import sys
import traceback
from collections.abc import Sequence

from .. import __version__
from ..errors import FcptsError, UserError
from . import pipeline, registry, run, step_commands, submit, sweep
from .common import PROG, Formatter, one_line
from .config import apply_config
from .pipeline import cmd_compile, load_pipeline_module  # noqa: F401  (used by tests and tools)
from .registry import cmd_promote, cmd_rollback
from .run import cmd_run
from .step_commands import cmd_allocate, cmd_calibrate, cmd_evaluate, cmd_register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=Formatter,
        description="fcpts: make a trained PyTorch model sparse without retraining, at exactly the "
        "global sparsity you ask for, with a learned per-layer allocation.",
        epilog="Steps: calibrate -> allocate -> evaluate -> register; `run` does all four through the "
        "Kubeflow Pipelines local runner, `compile` writes the pipeline for a cluster; every step logs "
        "to MLflow (--tracking-uri, --no-tracking) and `promote`/`rollback` move a registered "
        "model's champion alias.\n"
        "Exit codes: 0 success, 2 a mistake in the input (one line on stderr), 1 anything else.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    step_commands.add_parsers(sub)
    run.add_parsers(sub)
    pipeline.add_parsers(sub)
    sweep.add_parser(sub)
    registry.add_parsers(sub)
    submit.add_parsers(sub)
    return parser


COMMANDS = {
    "calibrate": cmd_calibrate,
    "allocate": cmd_allocate,
    "evaluate": cmd_evaluate,
    "register": cmd_register,
    "run": cmd_run,
    "compile": cmd_compile,
    "sweep": sweep.run,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    **submit.COMMANDS,
}


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
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except FcptsError as exc:
        print(f"{PROG}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("FCPTS_DEBUG"):
            traceback.print_exc()
        print(
            f"{PROG}: error: {type(exc).__name__}: {one_line(exc)} (set FCPTS_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
