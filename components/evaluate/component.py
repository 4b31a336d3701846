"""evaluate: compare sparse and dense on held-out data; output the gate decision."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output

from .. import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    model: str,
    sparse_model: Input[Model],
    metrics: Output[Metrics],
    report: Output[Markdown],
    report_html: Output[HTML],
    evaluation: Output[Artifact],
    data: str = "",
    weights: str = "",
    task: str = "auto",
    samples: int = 0,
    batch_size: int = 0,
    tolerance: float = 0.05,
    image_size: int = 0,
    image_mode: str = "RGB",
    device: str = "auto",
    tracking_uri: str = "",
    experiment: str = "fcpts",
    pipeline_run_id: str = "",
    kfp_run_id: str = "",
) -> bool:
    """Evaluate the sparse model against the dense one on the evaluation split (disjoint
    from calibration): task metric, sparsity counted from the weights, size on disk,
    CPU latency, the per-layer chart and the reports. Returns the approval gate's
    verdict for ``tolerance`` (the pipeline's dsl.If reads it).

    ``evaluation`` is a folder with metrics.json, allocation.png, report.md and
    report.html; ``metrics`` holds metrics.json and the headline scalars.
    ``tracking_uri`` (empty: no tracking), ``experiment`` and ``pipeline_run_id`` (empty:
    ``kfp_run_id``, the KFP run's id, which the pipeline passes) choose the MLflow run.
    """
    import shutil
    import time

    started = time.time()
    from fcpts.steps import Sources
    from fcpts.steps import evaluate as evaluate_step
    from fcpts.steps.tracked import Tracking

    result = evaluate_step(
        Sources(
            model=model,
            data=data or None,
            weights=weights or None,
            task=task,
            image_size=image_size or None,
            image_mode=image_mode,
        ),
        sparse_model.path,
        evaluation.path,
        samples=samples or None,
        batch_size=batch_size or None,
        device=device,
        tolerance=tolerance,
        tracking=Tracking.from_component(tracking_uri, experiment, pipeline_run_id, kfp_run_id),
    )
    files = result.files
    shutil.copyfile(files["metrics"], metrics.path)
    shutil.copyfile(files["markdown"], report.path)
    shutil.copyfile(files["html"], report_html.path)
    m = result.metrics
    metrics.log_metric(f"dense_{m['metric']}", m["dense"])
    metrics.log_metric(f"sparse_{m['metric']}", m["sparse"])
    metrics.log_metric("quality_drop", m["drop"])
    metrics.log_metric("achieved_sparsity", m["achieved_sparsity"])
    metrics.log_metric("size_ratio", m["size"]["ratio"])
    metrics.log_metric("dense_latency_ms", m["latency"]["dense_ms"])
    metrics.log_metric("sparse_latency_ms", m["latency"]["sparse_ms"])
    evaluation.metadata.update(
        {
            "approved": m["gate"]["approved"],
            "step_seconds": m["step_seconds"],
            "wall_seconds": round(time.time() - started, 3),
        }
    )
    return bool(m["gate"]["approved"])
