"""The step commands: ``fcpts calibrate``, ``allocate``, ``evaluate``, ``register``."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from ..errors import UserError
from ..steps.options import AllocationOptions
from ..storage import is_s3_uri
from .common import (
    DEFAULT_TOLERANCE,
    Formatter,
    allocator_settings,
    check_allocation_options,
    check_positive,
    get_option,
    progress_from_args,
    require_options,
    selection_overrides,
    sources_from_args,
    tracking_from_args,
)
from .derive import add_group, methods_help
from .options import (
    add_allocator,
    add_calibration,
    add_checkpoints,
    add_common,
    add_evaluation,
    add_gate,
    add_output,
    add_selection,
    add_sources,
    add_tracking,
)


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        formatter_class=Formatter,
        help="record calibration data, dense outputs and statistics",
        description="Resolve the model and the calibration data, check that they fit (one forward pass), "
        "and write a calibration folder: the batches, the dense model's reference outputs and, for "
        "activation-aware scores, per-layer input statistics (calibration.safetensors), described "
        "with sources, sample count, shapes and sha256 digests in calibration.json.",
    )
    add_sources(p)
    add_calibration(p)
    add_selection(p)
    add_output(p, "calibration folder to write, or s3://bucket/prefix (required)")
    add_tracking(p)
    add_common(p)

    p = sub.add_parser(
        "allocate",
        formatter_class=Formatter,
        help="allocate the target sparsity and save the sparse model",
        description="Allocate the global target sparsity over the prunable layers with a method from "
        f"the registry ({methods_help()}) and write the sparse model to DIR in the source's own format "
        "(a Hugging Face or sentence-transformers folder, a TorchScript file, or model.safetensors "
        "holding the state_dict), DIR/model.onnx and DIR/manifest.json (target, achieved_sparsity, zeros, "
        "prunable, method, score, per-layer figures). Give a --calibration folder, or --model (and "
        "--data) to calibrate on the fly.",
    )
    p.add_argument(
        "--calibration",
        metavar="DIR",
        default=None,
        help="a folder (or s3:// output) written by `fcpts calibrate` (else --model/--data "
        "are calibrated first)",
    )
    add_sources(p, model_required=False)
    add_calibration(p)
    add_allocator(p, target_required=True)
    add_selection(p)
    add_output(p, "sparse model folder to write, or s3://bucket/prefix (required)")
    add_checkpoints(p)
    add_tracking(p)
    add_common(p)

    p = sub.add_parser(
        "evaluate",
        formatter_class=Formatter,
        help="compare the sparse model with the dense one",
        description="Compare the sparse model with the dense one on held-out data disjoint from the "
        "calibration data: the task metric, the sparsity counted from the weights, size on disk "
        "(dense safetensors vs bitmask+values safetensors) and CPU latency. Writes DIR/metrics.json, "
        "DIR/allocation.png, DIR/report.md and DIR/report.html.",
    )
    add_sources(p)
    p.add_argument(
        "--sparse",
        metavar="DIR",
        default=None,
        help="the --out folder (or s3:// output) of `fcpts allocate` (required)",
    )
    add_evaluation(p, samples_alias=True)
    add_group(
        p,
        AllocationOptions,
        "batch norm",
        "Without --recalibrate-bn the sparse model is scored as allocate wrote it.",
        only=("recalibrate_bn",),
        helps={
            "recalibrate_bn": "re-estimate the sparse model's BatchNorm statistics on the "
            "calibration samples (taken again from --data or --calibration-data) before "
            "scoring it, unless allocate did"
        },
    )
    add_gate(p, registry=False, gate_optional=True)
    add_output(p, "folder for metrics.json and the reports, or s3://bucket/prefix (required)")
    add_tracking(p)
    add_common(p)

    p = sub.add_parser(
        "register",
        formatter_class=Formatter,
        help="apply the approval gate and record the decision",
        description="Approve the sparse model if its quality drop versus dense is within --tolerance and "
        "its sparsity counted from the weights is exactly the target; write DIR/decision.json with the "
        "reasons; hand an approved model to the registry: MLflow's (a new version, alias challenger, "
        "champion if it beats the champion), or --registry. --from registers a result that stayed "
        "on disk because the tracking store did not answer.",
    )
    p.add_argument(
        "--metrics",
        metavar="PATH",
        default=None,
        help="metrics.json, or the --out folder of `fcpts evaluate` (required unless --from)",
    )
    p.add_argument(
        "--sparse",
        metavar="DIR",
        default=None,
        help="the --out folder of `fcpts allocate` (required unless --from)",
    )
    p.add_argument(
        "--from",
        dest="from_path",
        metavar="DIR",
        default=None,
        help="a result left on disk: the folder of one `fcpts run` (runs/fcpts-sparsify-...) or "
        "the --out folder of `fcpts evaluate`; logs what its MLflow run lacks, then registers "
        "it (idempotent: no second version for the same run)",
    )
    add_gate(p, registry=True)
    add_output(p, "folder for decision.json (required; with --from: default DIR/register/decision)")
    add_tracking(p)
    add_common(p)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..steps import calibrate

    require_options(args, "model", "out")
    check_positive(args, "calibration_samples", "batch_size", "image_size")
    _check_out(args.out)
    cal = calibrate(
        sources_from_args(args),
        args.out,
        score=get_option(args, "score", "auto"),
        samples=args.calibration_samples,
        batch_size=args.batch_size,
        seed=get_option(args, "seed", 0),
        selection=selection_overrides(args) or None,
        device=get_option(args, "device", "auto"),
        progress=progress_from_args(args),
        tracking=tracking_from_args(args),
    )
    info = cal.info
    norms = info["input_norm_layers"]
    print(
        f"calibrated {info['model']['source']} on {info['samples']} samples of {info['data']['source']} "
        f"({info['batches']} batches of up to {info['batch_size']}, task {info['task']} "
        f"({info.get('task_reason') or 'given'}), score {info['score']}"
        + (f", input statistics for {len(norms)} layers" if norms else "")
        + f") in {info['step_seconds']:.1f} s\nwrote {_where(args.out, cal.path)}"
    )
    return 0


STRUCTURED = (
    "structure",
    "budget",
    "refit",
    "unit_multiple",
    "blockwise",
    "memory_mb",
)  # AllocationOptions fields passed as they are


def cmd_allocate(args: argparse.Namespace) -> int:
    from .. import report
    from ..steps import allocate, calibrate

    require_options(args, "target", "out")
    check_positive(
        args, "calibration_samples", "batch_size", "image_size", "iters", "checkpoint_every"
    )
    _check_out(args.out)
    settings = allocator_settings(args)
    common = {
        "target": args.target,
        "method": get_option(args, "method", "fcpts"),
        "settings": settings,
        "seed": get_option(args, "seed", 0),
        "device": get_option(args, "device", "auto"),
        "recalibrate_bn": bool(args.recalibrate_bn),
        "save": get_option(args, "save", "dense"),
        "progress": progress_from_args(args),
        **{k: get_option(args, k, getattr(AllocationOptions, k)) for k in STRUCTURED},
        "checkpoint_dir": get_option(args, "checkpoint_dir", None),
        "checkpoint_every": get_option(args, "checkpoint_every", 25),
        "resume": bool(get_option(args, "resume", False)),
    }
    selection = selection_overrides(args) or None
    check_allocation_options(common["target"], common["method"], settings, args.score)
    tracking = tracking_from_args(args)
    if args.calibration:
        from ..sources import DATA_FIELDS, flag_of

        given = [flag_of(f) for f in DATA_FIELDS if getattr(args, f, None)]
        if given:
            raise UserError(
                f"{given[0]} is not used with --calibration: the calibration folder holds the data"
            )
        resolved = None
        if args.model:
            from ..sources import resolve_model

            resolved = resolve_model(args.model, args.weights)
        result = allocate(
            args.calibration,
            args.out,
            score=args.score,
            selection=selection,
            resolved=resolved,
            tracking=tracking,
            **common,
        )
    else:
        require_options(args, "model")
        from ..sources import resolve_model

        resolved = resolve_model(args.model, args.weights)
        tracking = tracking.resolve() if tracking is not None else None  # one id for both steps
        with tempfile.TemporaryDirectory(prefix="fcpts-calibration-") as tmp:
            cal = calibrate(
                sources_from_args(args),
                tmp,
                score=get_option(args, "score", "auto"),
                samples=args.calibration_samples,
                batch_size=args.batch_size,
                seed=common["seed"],
                selection=selection,
                device=common["device"],
                progress=common["progress"],
                resolved=resolved,
                tracking=tracking,
            )
            result = allocate(cal, args.out, resolved=resolved, tracking=tracking, **common)
    m = result.manifest
    notes = []
    if m.get("history"):
        last = m["history"][-1]
        notes.append(
            f"final reconstruction loss on the calibration data {last.get('rec_loss', float('nan')):.4f} "
            "(evaluate for held-out quality vs dense)"
        )
    print(report.summary(manifest=m, notes=notes))
    onnx = " and model.onnx" if (m.get("onnx") or {}).get("file") else ""
    print(f"wrote {_where(args.out, result.path)}/{m.get('model_file')}{onnx} and manifest.json")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .. import report
    from ..sparse_model import read_manifest
    from ..steps import evaluate
    from ..steps.common import input_folder
    from ..steps.options import EvaluationOptions, group_values

    require_options(args, "model", "sparse", "out")
    check_positive(args, "evaluation_samples", "eval_batch_size", "image_size")
    _check_out(args.out)
    tolerance = args.tolerance
    if tolerance is not None:
        from ..steps.register import check_tolerance

        tolerance = check_tolerance(tolerance)
    result = evaluate(
        sources_from_args(args),
        args.sparse,
        args.out,
        samples=args.evaluation_samples,
        batch_size=args.eval_batch_size,
        seed=args.seed,
        device=get_option(args, "device", "auto"),
        tolerance=tolerance,
        **{k: v for k, v in group_values(EvaluationOptions, vars(args)).items() if "latency" in k},
        recalibrate_bn=bool(get_option(args, "recalibrate_bn", False)),
        progress=progress_from_args(args),
        tracking=tracking_from_args(args),
    )
    manifest = read_manifest(input_folder(args.sparse))
    m = result.metrics
    notes = m["latency"].get("notes", [])
    print(report.summary(manifest=manifest, metrics=m, decision=m.get("gate"), notes=notes))
    print(
        f"wrote {_where(args.out, result.path)}/metrics.json, allocation.png, report.md, report.html"
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from .. import report
    from ..steps import register

    tolerance = get_option(args, "tolerance", DEFAULT_TOLERANCE)
    tracking = tracking_from_args(args)
    if args.from_path:
        from ..steps.backfill import register_from

        if args.metrics or args.sparse:
            raise UserError("--from replaces --metrics and --sparse: give one or the other")
        if tracking is None:
            raise UserError("--from logs to MLflow: drop --no-tracking")
        result = register_from(
            args.from_path,
            args.out,
            tolerance=tolerance,
            tracking=tracking,
            name=args.name,
            registry=args.registry,
        )
    else:
        require_options(args, "metrics", "sparse", "out")
        result = register(
            args.metrics,
            args.sparse,
            args.out,
            tolerance=tolerance,
            registry=args.registry,
            name=args.name,
            tracking=tracking,
        )
    print(report.summary(decision=result.record))
    print(f"wrote {result.path}")
    return 0


def _check_out(out: str) -> None:
    """A one-line UserError, before any work, when ``--out`` names an existing file."""
    if not is_s3_uri(str(out)) and Path(out).expanduser().is_file():
        raise UserError(
            f"--out {out} is a file: give a folder path (new or existing) for the output"
        )


def _where(out: str, local: object) -> str:
    """What to print as written: the s3:// URI of a remote output, else the local folder."""
    return str(out).rstrip("/") if is_s3_uri(str(out)) else str(local)
