"""The KFP pipeline from the command line: ``fcpts compile``, and the pieces ``fcpts run``
uses to find the pipeline and follow the local runner's log."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

from ..errors import UserError
from .cluster import add_cluster_options, cluster_from_args
from .common import DEFAULT_PIPELINE_FILE, PIPELINE_STEPS, Formatter, get_option, say

SWEEP_PIPELINE_FILE = "sweep_pipeline.yaml"


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "compile",
        formatter_class=Formatter,
        help="write the pipelines as KFP v2 YAML",
        description="Compile pipelines/sparsify.py (calibrate -> allocate -> evaluate -> register "
        "if approved) and pipelines/sweep.py (an Optuna study with parallel workers, then the "
        "same steps with the best settings) into KFP v2 pipeline YAML for a cluster. Each step "
        "has CPU/memory requests and limits, a retry policy, caching and a timeout, and takes "
        "S3, MLflow and study-database credentials from the Kubernetes secrets fcpts-s3, "
        "fcpts-mlflow and fcpts-optuna-db as environment variables (never as parameters; "
        "rename them with FCPTS_K8S_S3_SECRET, FCPTS_K8S_MLFLOW_SECRET, FCPTS_K8S_OPTUNA_SECRET). "
        "The image, accelerators and checkpoint volume are fixed here (cluster options).",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        default=None,
        help=f"sparsify pipeline YAML to write (default: {DEFAULT_PIPELINE_FILE})",
    )
    p.add_argument(
        "--sweep-out",
        metavar="FILE",
        default=None,
        help=f"sweep pipeline YAML to write (default: {SWEEP_PIPELINE_FILE} beside --out)",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="YAML or JSON file of options (out, sweep_out and the cluster options apply)",
    )
    add_cluster_options(p)


def _writable(path: Path) -> Path:
    if path.parent and not path.parent.exists():
        raise UserError(f"folder {path.parent} does not exist")
    if path.is_dir():
        raise UserError(f"{path} is a folder: give a .yaml file name")
    return path


def cmd_compile(args: argparse.Namespace) -> int:
    from kfp import compiler

    module = load_pipeline_module()
    out = _writable(Path(get_option(args, "out", DEFAULT_PIPELINE_FILE)))
    sweep_out = _writable(
        Path(get_option(args, "sweep_out", None) or out.parent / SWEEP_PIPELINE_FILE)
    )
    if sweep_out.resolve() == out.resolve():
        raise UserError("--out and --sweep-out name the same file: give two file names")
    from pipelines import sweep
    from pipelines.k8s import cluster_options

    # built now, not at import: the secret names and images come from this call's environment
    cluster = cluster_options(cluster_from_args(args))
    compiler.Compiler().compile(module.build(cluster=cluster), str(out))
    compiler.Compiler().compile(sweep.build(cluster=cluster), str(sweep_out))
    where = f"image {cluster.image}"
    if cluster.gpu:
        where += f"; {cluster.gpu} x {cluster.gpu_type} for the allocator in {cluster.cuda_image}"
    if cluster.checkpoint_pvc:
        where += f"; allocate checkpoints on PVC {cluster.checkpoint_pvc}"
    print(
        f"wrote {out}: pipeline {module.PIPELINE_NAME} (calibrate -> allocate -> evaluate -> register if "
        f"approved), {where}"
    )
    print(
        f"wrote {sweep_out}: pipeline {sweep.PIPELINE_NAME} (sweep workers -> best settings -> calibrate -> "
        f"allocate -> evaluate -> register if approved), {where}"
    )
    return 0


# ----------------------------------------------------------------------------- pipeline


def project_root() -> Path:
    """The checkout holding components/ and pipelines/ (they are not part of the wheel)."""
    candidates = []
    if os.environ.get("FCPTS_PROJECT_ROOT"):
        candidates.append(Path(os.environ["FCPTS_PROJECT_ROOT"]))
    candidates.append(Path(__file__).resolve().parents[3])  # src/fcpts/cli/pipeline.py -> checkout
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


class PipelineLog:
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
                say(f"{self._label(m[1])} ...")
        elif m := _FINISHED.search(line):
            self.finished[m[1]] = (now, m[2])
            if not self.verbose:
                took = now - self.started.get(m[1], now)
                verdict = "done" if m[2] == "SUCCESS" else "FAILED"
                say(f"{self._label(m[1])} {verdict} in {took:.1f} s")
        elif m := _CACHED.search(line):
            self.cached.add(m[1])
            if not self.verbose:
                say(f"{self._label(m[1])} cached (outputs of an earlier run reused)")
        elif "[fcpts]" in line and not self.verbose:
            say("      " + line.split("[fcpts]", 1)[1].strip())
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
