"""allocate: run an allocator on the calibration artifact; output the sparse model."""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from .. import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def allocate(
    calibration: Input[Dataset],
    sparse_model: Output[Model],
    target: float = 0.5,
    method: str = "fcpts",
    score: str = "",
    settings: str = "{}",
    selection: str = "",
    seed: int = 0,
    recalibrate_bn: bool = False,
    device: str = "auto",
    log_every: int = 20,
    tracking_uri: str = "",
    experiment: str = "fcpts",
    pipeline_run_id: str = "",
    kfp_run_id: str = "",
):
    """Allocate ``target`` sparsity with ``method`` (uniform, global, erk, owl, fcpts) and
    write the sparse model folder: model.safetensors (the whole state_dict) and
    manifest.json. ``settings`` is a JSON object of allocator settings (e.g.
    {"iters": 100}); an empty ``score`` or ``selection`` keeps the calibration's.
    ``tracking_uri`` (empty: no tracking), ``experiment`` and ``pipeline_run_id`` (empty:
    ``kfp_run_id``, the KFP run's id, which the pipeline passes) choose the MLflow run.

    The fcpts method checkpoints every 25 iterations next to the output path
    (``<sparse_model.path>.checkpoint``) and resumes from there, so a retry of this
    step that sees the same local path (``fcpts run``'s local runner, a retried
    container in the same pod) continues where the killed one stopped. A retry in a new
    pod starts afresh: the checkpoint is on the lost pod's disk.
    """
    import json
    import time

    started = time.time()
    from fcpts.steps import allocate as allocate_step
    from fcpts.steps import settings_from_json
    from fcpts.steps.tracked import Tracking

    result = allocate_step(
        calibration.path,
        sparse_model.path,
        target=target,
        method=method,
        score=score or None,
        settings=settings_from_json(settings),
        selection=json.loads(selection) if selection else None,
        seed=seed,
        device=device,
        recalibrate_bn=recalibrate_bn,
        log_every=log_every,
        resume=True,
        tracking=Tracking.from_component(tracking_uri, experiment, pipeline_run_id, kfp_run_id),
    )
    m = result.manifest
    sparse_model.metadata.update(
        {
            "target": m["target"],
            "achieved_sparsity": m["achieved_sparsity"],
            "zeros": m["zeros"],
            "prunable": m["prunable"],
            "method": m["method"],
            "score": m["score"],
            "model_sha256": m["model_sha256"],
            "step_seconds": m["step_seconds"],
            "wall_seconds": round(time.time() - started, 3),
        }
    )
