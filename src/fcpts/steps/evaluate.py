"""Step 3, evaluate: compare the sparse model with the dense one on held-out data.

Writes to ``out_dir``: ``metrics.json`` (the task metric for dense and sparse, the
sparsity counted from the weights, sizes on disk, CPU latency, and the gate decision when
a tolerance is given), ``allocation.png`` (per-layer sparsity bars with the target line),
``report.md`` and ``report.html`` (the chart embedded).

The evaluation samples come from the evaluation split of the data, disjoint from the
calibration split: for the same data source the split uses the calibration's seed, and
every sample's digest is compared with the calibration's, so the report states how many
samples the two sets share (0 unless the data set holds duplicates).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__, report, speed
from ..core import resolve_device
from ..errors import UserError
from ..lm_metrics import lm_quality
from ..metrics import (
    mean_cosine,
    neighbour_agreement,
    outputs,
    relative_output_mse,
    sparsity_figures,
    state_zeros,
    top1,
)
from ..sources import (
    ResolvedModel,
    Sources,
    check_labels,
    evaluation_task,
    resolve_data,
    resolve_model,
    sample_digests,
    task_kind,
)
from ..sparse_model import load_sparse, read_manifest
from ..tasks import CausalLMTask, ClassifierTask, EncoderTask, Task, to_device
from . import common, measure
from .common import input_folder, is_remote, move, positive_int, write_json, write_output
from .progress import batch_progress
from .tracked import RECORD_KEY, Tracking, failure_recorded, finish_step, log_evaluation

FORMAT = "fcpts.metrics/1"
METRICS_FILE = "metrics.json"
CHART_FILE = "allocation.png"
REPORT_MD = "report.md"
REPORT_HTML = "report.html"
LATENCY_BATCH = 16  # samples in the batch timed for CPU latency


@dataclass
class Evaluation:
    path: Path
    metrics: dict[str, Any]

    @property
    def files(self) -> dict[str, Path]:
        return {
            name: self.path / f
            for name, f in (
                ("metrics", METRICS_FILE),
                ("chart", CHART_FILE),
                ("markdown", REPORT_MD),
                ("html", REPORT_HTML),
            )
        }


def evaluate(
    sources: Sources,
    sparse: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    device: str = "auto",
    tolerance: float | None = None,
    latency_seconds: float = 1.0,
    latency_engines: str = "torch,onnxruntime",
    latency_repeats: int = 20,
    recalibrate_bn: bool = False,
    progress: str = "auto",
    resolved: ResolvedModel | None = None,
    tracking: Tracking | None = None,
) -> Evaluation:
    """Evaluate the sparse model in ``sparse`` against the dense ``sources.model``.

    ``seed`` only matters for data other than the calibration's (the calibration's seed is
    used for the same data, keeping the splits disjoint). ``tolerance``, when given, adds
    the approval gate's decision to the metrics (see :func:`fcpts.steps.register.gate`).
    ``latency_seconds``, ``latency_engines`` and ``latency_repeats`` set the speed
    measurement (:func:`fcpts.speed.compare` on the first LATENCY_BATCH evaluation samples).
    ``recalibrate_bn`` re-estimates the sparse model's BatchNorm statistics on the
    calibration samples (found again in the calibration split of ``sources``) before it is
    scored, unless allocate did. ``progress``: see :class:`~fcpts.steps.common.Progress`.
    ``tracking`` logs the evaluation data, the metrics, the reports and the sparse model
    (MLflow's PyTorch flavour) to the pipeline's MLflow run after the folder is written
    (:mod:`fcpts.steps.tracked`). ``sparse`` may be an ``s3://`` output and ``out_dir`` an
    ``s3://`` prefix; the output is written whole or not at all
    (:func:`fcpts.steps.common.write_output`).
    """
    latency = (
        latency_seconds,
        speed.engine_list(latency_engines, "--latency-engines"),
        positive_int(latency_repeats, "--latency-repeats"),
    )
    sparse_dir = input_folder(sparse)
    if tracking is not None:
        tracking = tracking.resolve(read_manifest(sparse_dir))
    with failure_recorded(tracking, "evaluate"):
        (result, logged), local = write_output(
            out_dir,
            lambda folder: _evaluate(
                sources,
                sparse_dir,
                folder,
                sparse_ref=str(sparse) if is_remote(sparse) else str(Path(sparse)),
                samples=samples,
                batch_size=batch_size,
                seed=seed,
                device=device,
                tolerance=tolerance,
                latency=latency,
                recalibrate_bn=recalibrate_bn,
                progress=progress,
                resolved=resolved,
                tracking=tracking,
            ),
        )
        result.path = local
    if tracking is not None:
        run = tracking.open()
        log_evaluation(run, result.path, result.metrics, **logged)
        finish_step(run, "evaluate", result.metrics["step_seconds"])
    return result


def _evaluate(
    sources: Sources,
    sparse: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    sparse_ref: str,
    samples: int | None,
    batch_size: int | None,
    seed: int | None,
    device: str,
    tolerance: float | None,
    latency: tuple[float, tuple[str, ...], int],
    recalibrate_bn: bool,
    progress: str,
    resolved: ResolvedModel | None,
    tracking: Tracking | None,
) -> tuple[Evaluation, dict[str, Any]]:
    """The evaluation, and what tracking logs besides the files (see log_evaluation)."""
    start = time.perf_counter()
    model = resolved or resolve_model(sources.model, sources.weights)
    dense_digest = model.digest()
    sparse_net, manifest = load_sparse(model.model, sparse)
    if manifest.get("dense_model_sha256") and manifest["dense_model_sha256"] != dense_digest:
        raise UserError(
            f"the sparse model in {sparse} was made from a different dense model than {model.source} "
            "(weights differ): evaluate against the model you allocated from"
        )
    data = resolve_data(sources, model, "evaluation")
    choice = evaluation_task(sources.task, model, data, manifest)
    task = choice.task

    calib = manifest.get("calibration") or {}
    same_data = (
        calib.get("data", {}).get("source") == data.source
        and calib.get("data", {}).get("sha256") == data.digest
    )
    split_seed = int(calib.get("seed", 0)) if same_data else int(seed if seed is not None else 0)
    n = (
        positive_int(samples, "--evaluation-samples")
        if samples
        else model.defaults["evaluation_samples"]
    )
    bs = (
        positive_int(batch_size, "--eval-batch-size")
        if batch_size
        else model.defaults["evaluation_batch_size"]
    )
    batches = data.split("evaluation", n, bs, split_seed, exact=bool(samples))
    digests = sample_digests(batches)
    overlap = len(set(digests) & set(calib.get("sample_digests", [])))

    dev = resolve_device(device)
    recalibrated = common.recalibrate_bn(sparse_net, task, data, manifest) if recalibrate_bn else 0
    dense_net = move(model.model, dev).eval()
    sparse_net = move(sparse_net, dev).eval()
    dense_out = _outputs(dense_net, task, batches, dev, progress, "dense outputs")
    if isinstance(task, ClassifierTask):
        check_labels(data, int(dense_out.shape[-1]), batches)
    sparse_out = _outputs(sparse_net, task, batches, dev, progress, "sparse outputs")
    quality = _quality(task, dense_out, sparse_out, batches)

    layers = state_zeros(sparse_net.state_dict(), [m["name"] for m in manifest["layers"]])
    target = float(manifest["target"])
    counted = sparsity_figures(layers, target)
    counts_match = all(
        layer["zeros"] == m["zeros"] for layer, m in zip(layers, manifest["layers"], strict=True)
    )
    sparse_net = move(sparse_net, "cpu")
    move(dense_net, "cpu")
    size = measure.sizes(model.model, manifest, Path(sparse))
    latency = measure.latency(
        model.model,
        sparse_net,
        task,
        speed.head(to_device(batches[0], "cpu"), LATENCY_BATCH),
        latency,
        dev,
        sparse,
        manifest,
    )

    metrics: dict[str, Any] = {
        "format": FORMAT,
        "fcpts_version": __version__,
        **quality,
        "task": task_kind(task),
        "task_reason": choice.reason,
        "target": target,
        **counted,
        "manifest_zeros": manifest["zeros"],
        "counts_match_manifest": counts_match,
        "method": manifest.get("method"),
        "score": manifest.get("score"),
        "model": {"source": model.source, "sha256": dense_digest},
        "sparse_model": {"path": sparse_ref, "model_sha256": manifest.get("model_sha256")},
        "evaluation": {
            "data": data.source,
            "split": "evaluation",
            "seed": split_seed,
            "samples": len(digests),
            "batch_size": bs,
            "calibration_samples": len(calib.get("sample_digests", [])),
            "overlap_with_calibration": overlap,
            "same_data_as_calibration": same_data,
        },
        "recalibrated_batchnorm_layers_in_evaluation": recalibrated,
        "layers": layers,
        "densest_layers": [layer["name"] for layer in report.densest_layers(layers, 5)],
        "emptiest_layers": [layer["name"] for layer in report.sparsest_layers(layers, 5)],
        "size": size,
        "latency": latency,
    }
    if tolerance is not None:
        from .register import gate

        decision = gate(metrics, manifest, tolerance)
        metrics["gate"] = decision.to_dict(tolerance)
    if tracking is not None:
        metrics[RECORD_KEY] = tracking.record()
    metrics["step_seconds"] = round(time.perf_counter() - start, 3)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    title = f"{model.source}: {manifest.get('method')} at target {target:g}"
    report.chart(layers, target, out / CHART_FILE, title=title)
    (out / REPORT_MD).write_text(report.render_markdown(metrics, manifest, CHART_FILE))
    (out / REPORT_HTML).write_text(
        report.render_html(metrics, manifest, (out / CHART_FILE).read_bytes())
    )
    write_json(out / METRICS_FILE, metrics)
    logged = {
        "sparse_net": sparse_net,
        "batches": batches,
        "task": task,
        "data_source": data.source,
        "folder": Path(sparse),
    }
    return Evaluation(path=out, metrics=metrics), logged


def _outputs(net: nn.Module, task: Task, batches, dev, mode: str, what: str) -> torch.Tensor:
    return outputs(net, task, batch_progress(batches, task, "evaluate", mode, what), dev)


def _quality(task: Task, dense: torch.Tensor, sparse: torch.Tensor, batches) -> dict[str, Any]:
    if isinstance(task, CausalLMTask):
        return lm_quality(dense, sparse, batches)
    if isinstance(task, EncoderTask):
        return {
            "metric": "cosine",
            "metric_description": "mean cosine similarity of the sparse model's embeddings to the dense ones",
            "higher_is_better": True,
            "dense": 1.0,
            "sparse": mean_cosine(sparse, dense),
            "drop": 1.0 - mean_cosine(sparse, dense),
            "secondary": {
                "nn_agreement": {"dense": 1.0, "sparse": neighbour_agreement(dense, sparse)}
            },
        }
    if isinstance(task, ClassifierTask):
        labels = [b["y"] for b in batches if isinstance(b, Mapping) and "y" in b]
        agree = top1(sparse, dense.argmax(-1))
        if len(labels) == len(batches):
            y = torch.cat(labels)
            d, s = top1(dense, y), top1(sparse, y)
            description = "top-1 accuracy on the labelled evaluation samples"
        else:
            d, s = 1.0, agree
            description = (
                "top-1 agreement with the dense model's predictions (the data has no labels)"
            )
        return {
            "metric": "top1",
            "metric_description": description,
            "higher_is_better": True,
            "dense": d,
            "sparse": s,
            "drop": d - s,
            "secondary": {"agreement_with_dense": {"dense": 1.0, "sparse": agree}},
        }
    mse = relative_output_mse(dense, sparse)
    return {
        "metric": "relative_mse",
        "metric_description": "||sparse - dense||^2 / ||dense||^2 over the evaluation outputs",
        "higher_is_better": False,
        "dense": 0.0,
        "sparse": mse,
        "drop": mse,
        "secondary": {
            "cosine": {"dense": 1.0, "sparse": mean_cosine(sparse.flatten(1), dense.flatten(1))}
        },
    }
