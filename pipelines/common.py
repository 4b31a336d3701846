"""What the sparsify and sweep pipelines share: per-step resources, retries and caching,
the step chain calibrate -> allocate -> evaluate -> register-if-approved (:func:`chain`),
and pipeline functions whose parameters are derived from the components' declared
options (:func:`pipeline`), so no parameter list is typed twice.

Tracking: every step gets ``tracking_uri`` (empty: ``$MLFLOW_TRACKING_URI``, on a cluster
from the fcpts-mlflow secret, if set; ``none``: no tracking), ``experiment`` and
``pipeline_run_id``, plus ``kfp_run_id`` = the KFP run's id (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``,
resolved by a cluster and by kfp.local alike), which the steps use when
``pipeline_run_id`` is empty, so all steps of one KFP run share one MLflow run without an
extra task. `fcpts run` passes a fresh ``pipeline_run_id``, so with tracking on its
calibrate and allocate are recomputed, not taken from the cache (a cached step would leave
the new MLflow run without its calibration data and curves); without tracking the inputs
repeat and the cache works (kfp.local keys it on the unresolved placeholder).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kfp import dsl

from components.allocate.component import allocate
from components.build import STEPS, kfp_default, kfp_type, parameters
from components.calibrate.component import calibrate
from components.evaluate.component import evaluate
from components.register.component import register
from fcpts.steps.options import ClusterOptions

COMPONENTS = {"calibrate": calibrate, "allocate": allocate, "evaluate": evaluate}
KFP_TYPES = {"bool": bool, "int": int, "float": float, "str": str}

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


def in_image(component, image: str):
    """``component`` running in ``image`` (the same component when it already does)."""
    if component.component_spec.implementation.container.image == image:
        return component
    return dsl.component(base_image=image, install_kfp_package=False)(component.python_func)


def step_task(component, step: str, cluster: ClusterOptions, **arguments):
    """The task of ``component`` for ``step``, in the step's image (pipelines/k8s.py)."""
    from pipelines.k8s import step_image

    return in_image(component, step_image(cluster, step))(**arguments)


def configure(
    task,
    step: str,
    retries: bool,
    resources: dict | None = None,
    cluster: ClusterOptions | None = None,
):
    """Set a task's requests, limits, caching, timeout, Kubernetes secrets (as environment
    variables), accelerators and checkpoint volume (``cluster``, see pipelines/k8s.py), and
    its retry policy when ``retries``."""
    from kfp import kubernetes

    from pipelines.k8s import use_cluster, use_secrets

    spec = (resources or STEP_RESOURCES)[step]
    cpu, cpu_limit, memory, memory_limit, num_retries, cache = spec
    task.set_cpu_request(cpu).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory).set_memory_limit(memory_limit)
    task.set_caching_options(cache)
    if retries:
        task.set_retry(num_retries=num_retries, backoff_duration=BACKOFF, backoff_factor=2.0)
    kubernetes.set_timeout(task, STEP_TIMEOUTS[step])
    use_secrets(task, step)
    if cluster is not None:
        use_cluster(task, step, cluster)
    return task


def pipeline_parameters(
    steps: Sequence[str], defaults: Mapping[str, Any] | None = None, skip: Sequence[str] = ()
) -> list[inspect.Parameter]:
    """The union of the steps' declared parameters, each once, in step order, with their
    KFP types and defaults (``defaults`` overrides some, e.g. a demo model; ``skip`` leaves
    out those the pipeline sets itself)."""
    seen: dict[str, inspect.Parameter] = {}
    for step in steps:
        for setting in parameters(STEPS[step]):
            if setting.dest in seen or setting.dest in skip:
                continue
            default = (defaults or {}).get(setting.dest, kfp_default(setting))
            seen[setting.dest] = inspect.Parameter(
                setting.dest,
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                default=inspect.Parameter.empty if default is None else default,
                annotation=KFP_TYPES[kfp_type(setting)],
            )
    return list(seen.values())


def pipeline(
    name: str,
    description: str,
    params: list[inspect.Parameter],
    body: Callable[[dict[str, Any]], Any],
    returns: Any,
):
    """A ``dsl.pipeline`` whose signature is ``params`` (KFP calls it with one channel per
    parameter, in order) and whose body gets them as a dict."""
    ordered = sorted(params, key=lambda p: p.default is not inspect.Parameter.empty)

    def func(*channels):
        return body(dict(zip([p.name for p in ordered], channels, strict=True)))

    func.__name__ = func.__qualname__ = name.replace("-", "_")
    func.__signature__ = inspect.Signature(ordered, return_annotation=returns)
    func.__annotations__ = {p.name: p.annotation for p in ordered} | {"return": returns}
    return dsl.pipeline(name=name, description=description)(func)


def step_arguments(
    step: str, params: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The pipeline parameters a step's component takes, by name, plus the KFP run's id
    (``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, resolved by a cluster and by kfp.local alike);
    ``overrides`` replaces some (a task output, say)."""
    args = {s.dest: params[s.dest] for s in parameters(STEPS[step]) if s.dest in params}
    args["kfp_run_id"] = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    args.update(overrides or {})
    return args


def chain(
    params: Mapping[str, Any],
    retries: bool,
    resources: dict | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
    cluster: ClusterOptions | None = None,
):
    """calibrate -> allocate -> evaluate, then register under ``dsl.If`` on the gate, each
    in its image with its accelerators and volumes (``cluster``, resolved by
    ``pipelines.k8s.cluster_options``; None: the defaults); returns the calibrate,
    allocate and evaluate tasks.

    kfp.local 2.17 (SubprocessRunner) runs ``dsl.If`` itself, but its condition evaluator
    only resolves a task output named ``Output`` (the channel ``<task>-Output``): a named
    output such as a NamedTuple field ``approved`` is looked up as a pipeline parameter,
    is not found, the condition counts as false and the branch is silently skipped. So the
    gate is evaluate's return value, ``evaluate.outputs["Output"]``, which both the local
    runner and a cluster resolve.
    """
    from pipelines.k8s import cluster_options

    overrides = overrides or {}
    cluster = cluster or cluster_options()

    def step(component, name: str, **artifacts):
        arguments = step_arguments(name, params, overrides.get(name))
        task = step_task(component, name, cluster, **artifacts, **arguments)
        return configure(task, name, retries, resources, cluster)

    cal = step(calibrate, "calibrate")
    alloc = step(allocate, "allocate", calibration=cal.outputs["calibration"])
    sparse = alloc.outputs["sparse_model"]
    ev = step(evaluate, "evaluate", sparse_model=sparse)
    with dsl.If(ev.outputs["Output"] == True, name="approved"):  # noqa: E712 (a KFP condition, not a Python comparison)
        step(register, "register", sparse_model=sparse, metrics=ev.outputs["metrics"])
    return cal, alloc, ev
