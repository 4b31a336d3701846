"""calibrate: resolve model and data, check they fit, record reference outputs."""

from kfp import dsl
from kfp.dsl import Dataset, Output

from .. import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def calibrate(
    model: str,
    calibration: Output[Dataset],
    data: str = "",
    weights: str = "",
    task: str = "auto",
    score: str = "auto",
    samples: int = 0,
    batch_size: int = 0,
    seed: int = 0,
    selection: str = "",
    image_size: int = 0,
    image_mode: str = "RGB",
    device: str = "auto",
    tracking_uri: str = "",
    experiment: str = "fcpts",
    pipeline_run_id: str = "",
    kfp_run_id: str = "",
):
    """Resolve the model and data sources, check they fit (one forward pass), and write
    the calibration artifact: batches, dense reference outputs and, for activation-aware
    scores, per-layer input statistics (safetensors + calibration.json).

    Empty strings and zeros mean "the source's default"; ``selection`` is a JSON object
    with any of include, exclude, keep_dense, bounds, min_sparsity, max_sparsity.
    ``tracking_uri`` (empty: no tracking), ``experiment`` and ``pipeline_run_id`` (empty:
    ``kfp_run_id``, the KFP run's id, which the pipeline passes) choose the MLflow run.
    """
    import json
    import time

    started = time.time()
    from fcpts.steps import Sources
    from fcpts.steps import calibrate as calibrate_step
    from fcpts.steps.tracked import Tracking

    result = calibrate_step(
        Sources(
            model=model,
            data=data or None,
            weights=weights or None,
            task=task,
            image_size=image_size or None,
            image_mode=image_mode,
        ),
        calibration.path,
        score=score,
        samples=samples or None,
        batch_size=batch_size or None,
        seed=seed,
        selection=json.loads(selection) if selection else None,
        device=device,
        tracking=Tracking.from_component(tracking_uri, experiment, pipeline_run_id, kfp_run_id),
    )
    calibration.metadata.update(
        {
            "samples": result.info["samples"],
            "batches": result.info["batches"],
            "task": result.info["task"],
            "score": result.info["score"],
            "model_sha256": result.info["model"]["sha256"],
            "step_seconds": result.info["step_seconds"],
            "wall_seconds": round(time.time() - started, 3),
        }
    )
