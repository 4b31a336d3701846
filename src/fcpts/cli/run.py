"""``fcpts run``: the whole pipeline through the KFP local runner."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import FcptsError, UserError
from ..storage import is_s3_uri
from .arguments import pipeline_arguments
from .common import (
    DEFAULT_ROOT,
    DEFAULT_TOLERANCE,
    PIPELINE_STEPS,
    PROG,
    RUN_DEFAULT_TARGET,
    Formatter,
    allocator_settings,
    check_allocation_options,
    check_positive,
    get_option,
    one_line,
    say,
    selection_overrides,
    sources_from_args,
    tracking_from_args,
)
from .options import (
    add_allocator,
    add_calibration,
    add_common,
    add_evaluation,
    add_gate,
    add_selection,
    add_sources,
    add_tracking,
)
from .pipeline import PipelineLog, load_pipeline_module


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "run",
        formatter_class=Formatter,
        help="run the whole pipeline with the KFP local runner",
        description="Run the sparsify pipeline (calibrate -> allocate -> evaluate -> register if "
        "approved) with Kubeflow Pipelines' local SubprocessRunner in this Python environment, then "
        "print the summary and each step's wall time. Defaults: the MiniLM demo at global sparsity "
        f"{RUN_DEFAULT_TARGET:g}. Artifacts land under --root/<run>/<step>/; the full log in "
        "<run>/pipeline.log. With tracking (the default) the four steps log to one MLflow run "
        "and an approved model is registered; the command prints how to open it.",
    )
    add_sources(p, model_default="demo:minilm")
    add_calibration(p)
    add_allocator(p, target_required=False)
    add_selection(p)
    add_evaluation(p, samples_alias=False)
    add_gate(p, registry=True)
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
        help="reuse cached step outputs (KFP local caching; calibrate and allocate only). A "
        "tracked run has its own pipeline run id among the steps' inputs, so it recomputes them "
        "to log them; --no-tracking runs hit the cache",
    )
    g.add_argument(
        "--verbose", action="store_true", default=None, help="stream the full KFP log to stdout"
    )
    add_tracking(p)
    add_common(p)


def _preflight(args: argparse.Namespace, settings: Mapping[str, Any]) -> None:
    """Check the options before starting the pipeline (a bad input fails in a second,
    with exit code 2, instead of inside a step)."""
    from ..demos import DEMOS
    from ..sources import DATA_FIELDS, DEMO_PREFIX, flag_of, parse_function_source
    from ..steps.common import selection_from_dict
    from ..steps.register import check_tolerance, load_registry

    sources = sources_from_args(args)
    src = sources.model.strip()
    if src.startswith(DEMO_PREFIX):
        if src.removeprefix(DEMO_PREFIX) not in DEMOS:
            raise UserError(
                f"unknown demo {src!r}: choose one of {', '.join(DEMO_PREFIX + k for k in DEMOS)}"
            )
    elif not is_s3_uri(src) and not Path(src).expanduser().exists():
        if parse_function_source(src) is None:
            raise UserError(
                f"unknown model source {src!r}: give demo:minilm, demo:digits-cnn, a Hugging Face folder, "
                "a TorchScript file, or module:function with --weights"
            )
        if (
            sources.weights
            and not is_s3_uri(sources.weights)
            and not Path(sources.weights).expanduser().is_file()
        ):
            raise UserError(f"weights file {sources.weights} does not exist")
    for field in DATA_FIELDS:
        spec = getattr(sources, field)
        if spec and not spec.startswith(DEMO_PREFIX) and not is_s3_uri(spec):
            if not Path(spec).expanduser().exists():
                raise UserError(f"{flag_of(field)}: data file or folder {spec} does not exist")
    check_allocation_options(args.target, get_option(args, "method", "fcpts"), settings, args.score)
    check_tolerance(get_option(args, "tolerance", DEFAULT_TOLERANCE))
    selection_from_dict(selection_overrides(args))
    load_registry(args.registry)
    check_positive(
        args,
        "calibration_samples",
        "batch_size",
        "evaluation_samples",
        "eval_batch_size",
        "image_size",
    )


def cmd_run(args: argparse.Namespace) -> int:
    import warnings

    from .. import report

    command_start = time.perf_counter()
    args.model = args.model or "demo:minilm"
    args.target = RUN_DEFAULT_TARGET if args.target is None else args.target
    settings = allocator_settings(args)
    _preflight(args, settings)
    tracking = _tracking(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    module = load_pipeline_module()
    from kfp import local

    root = Path(get_option(args, "root", DEFAULT_ROOT)).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise UserError(f"--root {root} is a file: give a folder for the pipeline's artifacts")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--root {root}: cannot create the folder ({exc.strerror})") from None
    pipeline = module.build(retries=False)
    arguments = pipeline_arguments(
        args,
        settings,
        tracking,
        {name: spec.default for name, spec in pipeline.component_spec.inputs.items()},
    )
    iters = settings.get("iters")
    say(
        f"{PROG} run: pipeline {module.PIPELINE_NAME} on the KFP local runner (SubprocessRunner, this Python), "
        f"{args.model} at target {args.target:g} with {arguments['method']}"
        + (f" ({iters} iterations)" if iters is not None else "")
        + f"; artifacts under {root}"
    )
    log_path = root / f".{module.PIPELINE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = PipelineLog(log_path, bool(args.verbose), sys.stdout)
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
        *metrics["latency"].get("notes", []),
    ]
    print(
        report.summary(
            manifest=manifest, metrics=metrics, decision=decision, timings=timings, notes=notes
        )
    )
    print(f"artifacts: {run_dir}  (report: {evaluation_dir / 'report.html'}; log: {final_log})")
    if tracking is not None:
        print(tracking_summary(tracking))
    print(f"{PROG} run finished in {time.perf_counter() - command_start:.1f} s")
    return 0


def _tracking(args: argparse.Namespace):
    """The run's tracking with its store resolved to an absolute URI (the steps run in other
    folders) and a new pipeline run id; an mlflow server must answer before anything runs.
    Credentials in the URI move to the environment, which the steps inherit: the URI that
    becomes a pipeline argument (logged by KFP, on the steps' command lines) has none."""
    from dataclasses import replace

    tracking = tracking_from_args(args)
    if tracking is None:
        return None
    from ..tracking.connection import Store, is_http, resolve_tracking_uri
    from ..tracking.redaction import export_credentials

    uri = export_credentials(resolve_tracking_uri(tracking.uri))
    if is_http(uri):
        Store(uri).reachable_now()
    return replace(tracking, uri=uri).resolve()


def tracking_summary(tracking) -> str:
    """Where the pipeline's MLflow run is and how to open it."""
    from ..errors import ServiceError
    from ..tracking.connection import Store, is_http, sqlite_path
    from ..tracking.names import TAG_PIPELINE_RUN_ID
    from ..tracking.redaction import redact

    store = Store(tracking.uri)
    page, found = "", ""
    try:
        exp = store.call(
            "look up the experiment", store.client.get_experiment_by_name, tracking.experiment
        )
        query = f"tags.`{TAG_PIPELINE_RUN_ID}` = '{tracking.pipeline_run_id}'"
        runs = (
            store.call(
                "find the run", store.client.search_runs, [exp.experiment_id], filter_string=query
            )
            if exp is not None
            else []
        )
        if runs:
            page = f"#/experiments/{exp.experiment_id}/runs/{runs[0].info.run_id}"
            found = f", MLflow run {runs[0].info.run_id}"
    except ServiceError as exc:
        found = f" (not readable now: {one_line(exc)})"
    lines = [
        f"mlflow: pipeline run {tracking.pipeline_run_id} in experiment {tracking.experiment}"
        f"{found}, store {store.safe_uri}"
    ]
    if sqlite_path(tracking.uri) is not None:
        exe = Path(sys.executable).with_name("mlflow")
        shown = os.path.relpath(exe) if exe.is_file() else "mlflow"
        shown = shown if not shown.startswith("..") else str(exe)
        lines.append(
            f"open it: {shown} ui --backend-store-uri {tracking.uri}  "
            f"then http://127.0.0.1:5000/{page}"
        )
    elif is_http(tracking.uri):
        lines.append(f"open it: {redact(tracking.uri).rstrip('/')}/{page}")
    return "\n".join(lines)
