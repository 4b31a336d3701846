"""The sparsify pipeline: calibrate -> allocate -> evaluate -> register.

``register`` runs under ``dsl.If`` on the approval gate that ``evaluate`` returns.
Compile it with ``fcpts compile --out sparsify.yaml``; run it on this machine with
``fcpts run`` (KFP's local SubprocessRunner).

Per step: CPU/memory requests and limits sized for all-MiniLM-L6-v2 on CPU; retries for
transient pod failures (evictions, a registry that does not answer); caching on for the
deterministic, expensive steps (calibrate, allocate: same inputs and seed give the same
artifact) and off for evaluate (it measures latency on the node it runs on and feeds
the gate) and register (a side effect).

Tracking: ``tracking_uri`` (empty: none), ``experiment`` and ``pipeline_run_id`` (empty:
the KFP run's id) put all four steps in one MLflow run; see ``pipelines/common.py``.
The gate is evaluate's return value ``Output`` (see ``evaluate_and_register`` there for why).
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from components.allocate.component import allocate
from components.calibrate.component import calibrate
from pipelines.common import configure, evaluate_and_register, tracking_args

PIPELINE_NAME = "fcpts-sparsify"


class Outputs(NamedTuple):
    calibration: Dataset
    sparse_model: Model
    evaluation: Artifact


def build(retries: bool = True):
    """The pipeline function. ``retries=False`` drops the retry policies (``fcpts run``:
    on one machine a failed step fails the same way again)."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="fcpts: post-training sparsity with a learned per-layer allocation that "
        "lands exactly on the global target, evaluated against the dense model and gated.",
    )
    def sparsify(
        model: str = "demo:minilm",
        data: str = "",
        weights: str = "",
        task: str = "auto",
        target: float = 0.5,
        method: str = "fcpts",
        score: str = "auto",
        settings: str = "{}",
        selection: str = "",
        calibration_samples: int = 0,
        batch_size: int = 0,
        evaluation_samples: int = 0,
        eval_batch_size: int = 0,
        seed: int = 0,
        recalibrate_bn: bool = False,
        tolerance: float = 0.05,
        registry: str = "",
        name: str = "",
        image_size: int = 0,
        image_mode: str = "RGB",
        device: str = "auto",
        tracking_uri: str = "",
        experiment: str = "fcpts",
        pipeline_run_id: str = "",
    ) -> Outputs:
        tracking = tracking_args(tracking_uri, experiment, pipeline_run_id)
        cal = calibrate(
            model=model,
            data=data,
            weights=weights,
            task=task,
            score=score,
            samples=calibration_samples,
            batch_size=batch_size,
            seed=seed,
            selection=selection,
            image_size=image_size,
            image_mode=image_mode,
            device=device,
            **tracking,
        )
        configure(cal, "calibrate", retries)
        alloc = allocate(
            calibration=cal.outputs["calibration"],
            target=target,
            method=method,
            score=score,
            settings=settings,
            selection=selection,
            seed=seed,
            recalibrate_bn=recalibrate_bn,
            device=device,
            **tracking,
        )
        configure(alloc, "allocate", retries)
        ev = evaluate_and_register(
            model=model,
            sparse_model=alloc.outputs["sparse_model"],
            data=data,
            weights=weights,
            task=task,
            evaluation_samples=evaluation_samples,
            eval_batch_size=eval_batch_size,
            tolerance=tolerance,
            registry=registry,
            name=name,
            image_size=image_size,
            image_mode=image_mode,
            device=device,
            tracking=tracking,
            retries=retries,
        )
        return Outputs(
            calibration=cal.outputs["calibration"],
            sparse_model=alloc.outputs["sparse_model"],
            evaluation=ev.outputs["evaluation"],
        )

    return sparsify


sparsify_pipeline = build()
