"""Option groups shared by several ``fcpts`` commands."""

from __future__ import annotations

import argparse

from ..tracking.names import DEFAULT_EXPERIMENT
from .common import (
    DATA_HELP,
    DEFAULT_TOLERANCE,
    MODEL_HELP,
)
from .derive import add_allocator_settings, methods_help


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
        help=f"allocation method: {methods_help()} (default: fcpts, the learned allocation)",
    )
    g.add_argument(
        "--set",
        dest="settings_flags",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an allocator setting by its name, e.g. --set schedule=cosine (every setting also "
        "has its own flag, listed under the method's settings below; config file: a 'settings' "
        "mapping or the flag names)",
    )
    g.add_argument(
        "--recalibrate-bn",
        action="store_true",
        default=None,
        help="re-estimate BatchNorm statistics of the sparse model on the calibration data",
    )
    add_allocator_settings(p)


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


def _add_tracking(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "tracking",
        "All steps of one pipeline run log to one MLflow run, found by the pipeline run id; a "
        "step given no id continues the run recorded in its input folder.",
    )
    g.add_argument(
        "--tracking-uri",
        metavar="URI",
        default=None,
        help="MLflow tracking store: an mlflow server (http://host:5000), a database URI, or a "
        "folder for an embedded store (default: $MLFLOW_TRACKING_URI, else the embedded "
        "sqlite:///./mlruns/mlflow.db with artifacts in ./mlruns/artifacts)",
    )
    g.add_argument(
        "--experiment",
        metavar="NAME",
        default=None,
        help="MLflow experiment (default: the one recorded in the input folder, else "
        f"{DEFAULT_EXPERIMENT})",
    )
    g.add_argument(
        "--pipeline-run-id",
        metavar="ID",
        default=None,
        help="the pipeline run to log to (letters, digits, . _ -; default: the one recorded in "
        "the input folder, else a new one)",
    )
    g.add_argument(
        "--no-tracking",
        dest="tracking",
        action="store_false",
        default=None,
        help="log nothing to MLflow (and register nowhere unless --registry is given)",
    )
