"""What the sparsify and sweep pipelines share: per-step resources, retries and caching,
the tracking arguments every step takes, and the evaluate -> register-if-approved tail.

Tracking: every step gets ``tracking_uri`` (empty: no tracking), ``experiment`` and
``pipeline_run_id``, plus ``kfp_run_id`` = the KFP run's id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``,
resolved by a cluster and by kfp.local alike), which the steps use when
``pipeline_run_id`` is empty, so all steps of one KFP run share one MLflow run without an
extra task. `fcpts run` passes a fresh ``pipeline_run_id``, so with tracking on its
calibrate and allocate are recomputed, not taken from the cache (a cached step would leave
the new MLflow run without its calibration data and curves); without tracking the inputs
repeat and the cache works (kfp.local keys it on the unresolved placeholder).
"""

from __future__ import annotations

from kfp import dsl

from components.evaluate.component import evaluate
from components.register.component import register

# (cpu request, cpu limit, memory request, memory limit, retries, caching)
STEP_RESOURCES = {
    "calibrate": ("2", "4", "4G", "8G", 2, True),
    "allocate": ("4", "8", "8G", "16G", 1, True),
    "evaluate": ("2", "4", "4G", "8G", 2, False),
    "register": ("500m", "1", "1G", "2G", 3, False),
}
BACKOFF = "30s"


# Longest a step may run on a cluster before Kubernetes stops it (a retry starts afresh;
# allocate resumes from its checkpoint).
STEP_TIMEOUTS = {
    "calibrate": 3600,
    "allocate": 6 * 3600,
    "evaluate": 3600,
    "register": 900,
    "sweep-prepare": 1800,
    "sweep-worker": 12 * 3600,
    "sweep-best": 900,
}


def configure(task, step: str, retries: bool, resources: dict | None = None):
    """Set a task's requests, limits, caching, timeout and Kubernetes secrets (as
    environment variables, see pipelines/k8s.py), and its retry policy when ``retries``."""
    from kfp import kubernetes

    from pipelines.k8s import use_secrets

    spec = (resources or STEP_RESOURCES)[step]
    cpu, cpu_limit, memory, memory_limit, num_retries, cache = spec
    task.set_cpu_request(cpu).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory).set_memory_limit(memory_limit)
    task.set_caching_options(cache)
    if retries:
        task.set_retry(num_retries=num_retries, backoff_duration=BACKOFF, backoff_factor=2.0)
    kubernetes.set_timeout(task, STEP_TIMEOUTS[step])
    use_secrets(task, step)
    return task


def tracking_args(tracking_uri, experiment, pipeline_run_id) -> dict:
    """The tracking inputs of a step (pipeline parameters plus the KFP run's id)."""
    return {
        "tracking_uri": tracking_uri,
        "experiment": experiment,
        "pipeline_run_id": pipeline_run_id,
        "kfp_run_id": dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    }


def evaluate_and_register(
    *,
    model,
    sparse_model,
    data,
    weights,
    task,
    evaluation_samples,
    eval_batch_size,
    tolerance,
    registry,
    name,
    image_size,
    image_mode,
    device,
    tracking: dict,
    retries: bool,
):
    """evaluate, then register under ``dsl.If`` on the gate; returns the evaluate task.

    kfp.local 2.17 (SubprocessRunner) runs ``dsl.If`` itself, but its condition evaluator
    only resolves a task output named ``Output`` (the channel ``<task>-Output``): a named
    output such as a NamedTuple field ``approved`` is looked up as a pipeline parameter,
    is not found, the condition counts as false and the branch is silently skipped. So the
    gate is evaluate's return value, ``evaluate.outputs["Output"]``, which both the local
    runner and a cluster resolve.
    """
    ev = evaluate(
        model=model,
        sparse_model=sparse_model,
        data=data,
        weights=weights,
        task=task,
        samples=evaluation_samples,
        batch_size=eval_batch_size,
        tolerance=tolerance,
        image_size=image_size,
        image_mode=image_mode,
        device=device,
        **tracking,
    )
    configure(ev, "evaluate", retries)
    with dsl.If(ev.outputs["Output"] == True, name="approved"):  # noqa: E712 (a KFP condition, not a Python comparison)
        reg = register(
            sparse_model=sparse_model,
            metrics=ev.outputs["metrics"],
            tolerance=tolerance,
            registry=registry,
            name=name,
            **tracking,
        )
        configure(reg, "register", retries)
    return ev
