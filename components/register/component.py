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
):
    """Re-apply the approval gate (quality drop within ``tolerance``, sparsity exactly at
    the target) and write decision.json (approved, reasons) to the ``decision`` folder;
    when approved, call the registry ``module:function`` (empty: $FCPTS_REGISTRY, or
    record only).
    """
    import time

    started = time.time()
    from fcpts.steps import register as register_step

    result = register_step(
        metrics.path,
        sparse_model.path,
        decision.path,
        tolerance=tolerance,
        registry=registry or None,
        name=name or None,
    )
    decision.metadata.update(
        {
            "approved": result.decision.approved,
            "registration": str((result.record.get("registration") or {}).get("status")),
            "wall_seconds": round(time.time() - started, 3),
        }
    )
