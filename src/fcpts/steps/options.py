"""The steps' options, declared once (see :mod:`fcpts.settings`).

Each group is a frozen dataclass whose field names are the step functions' keyword
arguments; each field's :class:`~fcpts.settings.Opt` names its flag, which is also its
``--config`` key and its KFP parameter (``samples`` of the calibration is
``--calibration-samples`` / ``calibration_samples``, of the evaluation
``--evaluation-samples`` / ``evaluation_samples``). The CLI (:mod:`fcpts.cli.derive`), the
KFP components (``components/build.py``) and the pipelines derive their options from
these groups together with :class:`~fcpts.sources.Sources` and
:class:`~fcpts.core.LayerSelection`; :func:`group_values` turns given values back into a
step's keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from ..settings import Opt, declared


@dataclass(frozen=True)
class RunOptions:
    """Where and with which seed a step computes."""

    device: Annotated[
        Literal["auto", "cpu", "cuda"],
        Opt("where to compute: auto (CUDA if present, else CPU), cpu or cuda"),
    ] = "auto"
    seed: Annotated[int, Opt("seed of the data split and of the learned method", metavar="N")] = 0


@dataclass(frozen=True)
class CalibrationOptions:
    """What calibrate records, and from how many samples."""

    score: Annotated[
        Literal["auto", "magnitude", "wanda"],
        Opt(
            "importance score: magnitude |w|, or wanda |w|*||x|| (activation-aware: calibration "
            "records per-layer input statistics); auto is wanda whenever there is calibration "
            "data (magnitude for TorchScript models); allocate's default is the calibration's"
        ),
    ] = "auto"
    samples: Annotated[
        int | None,
        Opt(
            "calibration samples (default: the source's: 512 MiniLM sentences, 300 digits, "
            "256 otherwise)",
            flag="calibration-samples",
            metavar="N",
        ),
    ] = None
    batch_size: Annotated[
        int | None,
        Opt(
            "calibration batch size; the learned method's speed depends on it (default: 16 for "
            "encoders, 64 for demo:digits-cnn, 32 otherwise)",
            metavar="N",
        ),
    ] = None


@dataclass(frozen=True)
class AllocationOptions:
    """The target and the method that allocates it."""

    target: Annotated[
        float,
        Opt(
            "global sparsity: the fraction of prunable weights that will be zero, strictly "
            "between 0 and 1; landed exactly (round(S x N) zeros)",
            metavar="S",
            required=True,
        ),
    ] = 0.5
    method: Annotated[
        str,
        Opt("allocation method", metavar="NAME"),
    ] = "fcpts"
    structure: Annotated[
        str,
        Opt(
            "what is removed: unstructured (single weights), N:M such as 2:4 (at most N "
            "nonzeros in every M consecutive input weights; a layer is N:M or dense), or units "
            "(whole attention heads, FFN neurons, CNN output channels: the output is a "
            "smaller dense model)",
            metavar="unstructured|N:M|units",
        ),
    ] = "unstructured"
    budget: Annotated[
        Literal["params", "flops", "bytes"],
        Opt(
            "what the target is a fraction of with --structure units: params, flops "
            "(multiply-accumulates per sample at the calibration input shape) or bytes (the "
            "written file); landed to one unit"
        ),
    ] = "params"
    refit: Annotated[
        bool,
        Opt(
            "with --structure units, refit every layer that reads a removed unit by least "
            "squares on the calibration activations (after fcpts's joint reconstruction only "
            "when that lowers the loss on its held-out calibration batches)"
        ),
    ] = True
    unit_multiple: Annotated[
        int,
        Opt(
            "with --structure units, keep a multiple of N units in every group of at least 2N "
            "(the widths CPU kernels run fastest at; 1: any width); lands to one block of N "
            "units",
            metavar="N",
        ),
    ] = 8
    recalibrate_bn: Annotated[
        bool,
        Opt("re-estimate BatchNorm statistics of the sparse model on the calibration data"),
    ] = False
    save: Annotated[
        Literal["dense", "compressed"],
        Opt(
            "how the output folder holds the weights: dense (in the source's own format, "
            "loadable without fcpts, plus model.onnx) or compressed (pruned weights as a "
            "bitmask plus the kept values, which fcpts loads back exactly; no model.onnx)"
        ),
    ] = "dense"
    blockwise: Annotated[
        Literal["off", "on", "auto"],
        Opt(
            "allocate a Hugging Face decoder block by block (method fcpts, unstructured, "
            "wanda scores, every linear layer of the blocks): one block learned at a time "
            "under one global constraint (the target stays exact), calibration activations "
            "within --memory-mb, a checkpoint per block that --resume continues; auto: "
            "block-wise where it applies and the whole-model learning (about 5x the model's "
            "fp32 weights) would exceed --memory-mb"
        ),
    ] = "off"
    memory_mb: Annotated[
        int | None,
        Opt(
            "the block-wise memory bound in MiB: calibration activations kept in memory "
            "(beyond it they are spilled to disk), and what --blockwise auto compares the "
            "whole-model learning with (default: fcpts.blockwise.BlockwiseConfig's)",
            metavar="MIB",
        ),
    ] = None


@dataclass(frozen=True)
class CheckpointOptions:
    """How the learned method survives an interruption."""

    checkpoint_every: Annotated[
        int,
        Opt(
            "save the allocator's whole state every N iterations; the checkpoint is deleted "
            "once the output is written",
            metavar="N",
            kfp=False,
        ),
    ] = 25
    checkpoint_dir: Annotated[
        str | None,
        Opt(
            "folder for the checkpoint (default: OUT.checkpoint next to a local --out, a folder "
            "in the fcpts cache for an s3:// --out)",
            metavar="DIR",
            kfp=False,
        ),
    ] = None
    resume: Annotated[
        bool,
        Opt(
            "continue from the checkpoint of an interrupted run with the same inputs (none "
            "there: start afresh); the result equals an uninterrupted run's (KFP steps always "
            "resume)",
            kfp=False,
        ),
    ] = False


@dataclass(frozen=True)
class EvaluationOptions:
    """How many held-out samples evaluate scores, and how long it times."""

    samples: Annotated[
        int | None,
        Opt(
            "held-out evaluation samples, disjoint from calibration (default: the source's: "
            "512 MiniLM sentences, 300 digits, 512 otherwise)",
            flag="evaluation-samples",
            metavar="N",
        ),
    ] = None
    batch_size: Annotated[
        int | None,
        Opt(
            "evaluation batch size, also the batch timed for latency (default: 64)",
            flag="eval-batch-size",
            metavar="N",
        ),
    ] = None
    latency_seconds: Annotated[
        float,
        Opt(
            "time budget of each engine's speed measurement (dense and sparse interleaved; "
            "at least 3 timed runs each)",
            metavar="S",
        ),
    ] = 1.0
    latency_engines: Annotated[
        str,
        Opt(
            "engines the speed-up is measured on, comma-separated: torch, onnxruntime, "
            "torch-csr (pruned Linear weights as sparse CSR); cuda and cuda-2to4 (2:4 "
            "weights as semi-structured sparse tensors) are added where a CUDA GPU is",
            metavar="LIST",
        ),
    ] = "torch,onnxruntime"
    latency_repeats: Annotated[
        int, Opt("most timed runs of each model per engine (the median is reported)", metavar="N")
    ] = 20


@dataclass(frozen=True)
class GateOptions:
    """The approval gate."""

    tolerance: Annotated[
        float,
        Opt(
            "largest allowed quality drop versus dense, in the metric's units (top-1, cosine, "
            "relative MSE)",
            metavar="X",
        ),
    ] = 0.05


@dataclass(frozen=True)
class RegistryOptions:
    """Where an approved model is registered."""

    registry: Annotated[
        str | None,
        Opt(
            "registry called with the approved model (a fcpts.steps.RegistryRequest); "
            "default: MLflow's when tracking, else $FCPTS_REGISTRY, else the decision is "
            "recorded only",
            metavar="MODULE:FUNCTION",
        ),
    ] = None
    name: Annotated[
        str | None,
        Opt(
            "registered model to add the version to (default: <model>-<method>, one for "
            "every target: the sparsest approved version is champion, the metric decides "
            "at the same sparsity; see fcpts.tracking.decision.decide)",
            metavar="NAME",
        ),
    ] = None


def group_values(group: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """A group's fields as step keyword arguments from values keyed by the options'
    public names (argparse dests, KFP parameters); missing or None values keep the
    declared default."""
    out = {}
    for setting in declared(group):
        value = values.get(setting.dest)
        out[setting.name] = setting.default if value is None else value
    return out


@dataclass(frozen=True)
class TrackingOptions:
    """Which MLflow store and run a step logs to (see :class:`fcpts.steps.tracked.Tracking`)."""

    tracking_uri: Annotated[
        str | None,
        Opt(
            "MLflow tracking store: an mlflow server (http://host:5000), a database URI, or a "
            "folder for an embedded store (default: $MLFLOW_TRACKING_URI, else the embedded "
            "sqlite:///./mlruns/mlflow.db with artifacts in ./mlruns/artifacts; in a KFP step "
            "empty means $MLFLOW_TRACKING_URI, from the fcpts-mlflow secret, if set, and none "
            "turns tracking off)",
            metavar="URI",
        ),
    ] = None
    experiment: Annotated[
        str | None,
        Opt(
            "MLflow experiment (default: the one recorded in the input folder, else fcpts)",
            metavar="NAME",
        ),
    ] = None
    pipeline_run_id: Annotated[
        str | None,
        Opt(
            "the pipeline run to log to (letters, digits, . _ -; default: the one recorded in "
            "the input folder, else a new one; in a KFP step the KFP run's id)",
            metavar="ID",
        ),
    ] = None


def from_kfp(group: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`group_values` of KFP inputs, where an empty string or a zero stands for "not
    given" (KFP parameters cannot be None) in the fields declared optional."""
    cleaned = {}
    for setting in declared(group):
        value = values.get(setting.dest)
        if setting.optional and value in ("", 0):
            value = None
        cleaned[setting.dest] = value
    return group_values(group, cleaned)


@dataclass(frozen=True)
class PipelineOptions:
    """What only the KFP components and pipelines take (the CLI has flags for their parts)."""

    selection: Annotated[
        str,
        Opt(
            "layer selection as a JSON object with any of include, exclude, keep_dense, "
            "bounds, min_sparsity, max_sparsity (empty: the source's default)",
            cli=False,
        ),
    ] = ""
    settings: Annotated[
        str,
        Opt(
            "the method's settings as a JSON object, by the names in the settings tables, "
            'e.g. {"iters": 100} (empty: the defaults)',
            cli=False,
        ),
    ] = "{}"
    log_every: Annotated[
        int, Opt("print a progress line every N iterations of a learned method", cli=False)
    ] = 20


@dataclass(frozen=True)
class ClusterOptions:
    """Where a compiled pipeline's steps run on a cluster: fixed when the pipeline is
    compiled (``fcpts compile``, ``fcpts submit``), no pipeline parameters."""

    image: Annotated[
        str | None,
        Opt(
            "container image of the steps (default: $FCPTS_IMAGE, else the project's image "
            "named in components/__init__.py); build and push it with make image PUSH=1",
            metavar="REF",
            kfp=False,
        ),
    ] = None
    cuda_image: Annotated[
        str | None,
        Opt(
            "image of the steps that get --gpu (default: $FCPTS_CUDA_IMAGE, else the image "
            "with -cuda appended, as make image VARIANT=cuda tags it)",
            metavar="REF",
            kfp=False,
        ),
    ] = None
    gpu: Annotated[
        int,
        Opt(
            "accelerators requested by the steps that run the allocator (allocate, "
            "sweep-worker), which then run in the CUDA image (0: CPU only)",
            metavar="N",
            kfp=False,
        ),
    ] = 0
    gpu_type: Annotated[
        str,
        Opt(
            "the accelerator's Kubernetes resource, used with --gpu", metavar="RESOURCE", kfp=False
        ),
    ] = "nvidia.com/gpu"
    checkpoint_pvc: Annotated[
        str | None,
        Opt(
            "PersistentVolumeClaim (ReadWriteOnce is enough) mounted where the allocate step "
            "checkpoints, so a retry in a new pod resumes (default: none: the checkpoint lives "
            "in the pod and a retry in a new pod starts afresh)",
            metavar="NAME",
            kfp=False,
        ),
    ] = None
