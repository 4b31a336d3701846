"""The sparsify pipeline: calibrate -> allocate -> evaluate -> register.

``register`` runs under ``dsl.If`` on the approval gate that ``evaluate`` returns.
Compile it with ``fcpts compile --out sparsify.yaml``; run it on this machine with
``fcpts run`` (KFP's local SubprocessRunner).

Per step: CPU/memory requests and limits sized for all-MiniLM-L6-v2 on CPU; retries for
transient pod failures (evictions, a registry that does not answer); caching on for the
deterministic, expensive steps (calibrate, allocate: same inputs and seed give the same
artifact) and off for evaluate (it measures latency on the node it runs on and feeds
the gate) and register (a side effect).

Its parameters are the union of the four components' parameters (derived from the
declared options; see components/<step>/README.md). Tracking: ``tracking_uri`` (empty:
``$MLFLOW_TRACKING_URI`` from the fcpts-mlflow secret if set; ``none``: off), ``experiment`` and ``pipeline_run_id`` (empty: the KFP run's id) put all four steps
in one MLflow run. The gate is evaluate's return value ``Output`` (see ``chain`` in
``pipelines/common.py`` for why).
"""

from typing import NamedTuple

from kfp.dsl import Artifact, Dataset, Model

from fcpts.steps.options import ClusterOptions
from pipelines.common import chain, pipeline, pipeline_parameters
from pipelines.k8s import cluster_options

PIPELINE_NAME = "fcpts-sparsify"
STEPS = ("calibrate", "allocate", "evaluate", "register")
DEFAULTS = {"model": "demo:minilm"}


class Outputs(NamedTuple):
    calibration: Dataset
    sparse_model: Model
    evaluation: Artifact


def build(retries: bool = True, cluster: ClusterOptions | None = None):
    """The pipeline. ``retries=False`` drops the retry policies (``fcpts run``: on one
    machine a failed step fails the same way again); ``cluster``: the image, accelerators
    and checkpoint volume (pipelines/k8s.py; None: the defaults and the environment's)."""
    resolved = cluster_options(cluster)

    def body(params):
        cal, alloc, ev = chain(params, retries, cluster=resolved)
        return Outputs(
            calibration=cal.outputs["calibration"],
            sparse_model=alloc.outputs["sparse_model"],
            evaluation=ev.outputs["evaluation"],
        )

    return pipeline(
        PIPELINE_NAME,
        "fcpts: post-training sparsity with a learned per-layer allocation that lands exactly "
        "on the global target, evaluated against the dense model and gated.",
        pipeline_parameters(STEPS, DEFAULTS),
        body,
        Outputs,
    )


sparsify_pipeline = build()
