"""register: apply the approval gate, record the decision, hand over to a registry."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from .. import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def register(
    sparse_model: Input[Model],
    metrics: Input[Metrics],
    decision: Output[Artifact],
    tolerance: float = 0.05,
    registry: str = "",
    name: str = "",
    tracking_uri: str = "",
    experiment: str = "fcpts",
    pipeline_run_id: str = "",
    kfp_run_id: str = "",
):
    """Re-apply the approval gate (quality drop within ``tolerance``, sparsity exactly at
    the target) and write decision.json (approved, reasons) to the ``decision`` folder;
    hand the decision to the registry ``module:function`` (empty: MLflow's registry when
    tracking, else $FCPTS_REGISTRY, else record only; it registers approved models only).
    ``tracking_uri`` (empty: no tracking), ``experiment`` and ``pipeline_run_id`` (empty:
    ``kfp_run_id``, the KFP run's id, which the pipeline passes) choose the MLflow run.
    """
    import time

    started = time.time()
    from fcpts.steps import register as register_step
    from fcpts.steps.tracked import Tracking

    result = register_step(
        metrics.path,
        sparse_model.path,
        decision.path,
        tolerance=tolerance,
        registry=registry or None,
        name=name or None,
        tracking=Tracking.from_component(tracking_uri, experiment, pipeline_run_id, kfp_run_id),
    )
    decision.metadata.update(
        {
            "approved": result.decision.approved,
            "registration": str((result.record.get("registration") or {}).get("status")),
            "wall_seconds": round(time.time() - started, 3),
        }
    )
