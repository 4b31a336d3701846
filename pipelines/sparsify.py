"""The sparsify pipeline: calibrate -> allocate -> evaluate -> register.

``register`` runs under ``dsl.If`` on the approval gate that ``evaluate`` returns.
Compile it with ``fcpts compile --out sparsify.yaml``; run it on this machine with
``fcpts run`` (KFP's local SubprocessRunner).

Per step: CPU/memory requests and limits sized for all-MiniLM-L6-v2 on CPU; retries for
transient pod failures (evictions, a registry that does not answer); caching on for the
deterministic, expensive steps (calibrate, allocate: same inputs and seed give the same
artifact) and off for evaluate (it measures latency on the node it runs on and feeds
the gate) and register (a side effect).

kfp.local 2.17 (SubprocessRunner) runs ``dsl.If`` itself, but its condition evaluator
only resolves a task output named ``Output`` (the channel ``<task>-Output``): a named
output such as a NamedTuple field ``approved`` (channel ``evaluate-approved``) is looked
up as a pipeline parameter, is not found ("Could not resolve parent input"), the
condition counts as false and the branch is silently skipped. So the gate is evaluate's
return value, ``evaluate.outputs["Output"]``, which both the local runner and a cluster
resolve.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Model

from components.allocate.component import allocate
from components.calibrate.component import calibrate
from components.evaluate.component import evaluate
from components.register.component import register

PIPELINE_NAME = "fcpts-sparsify"

# (cpu request, cpu limit, memory request, memory limit, retries, caching)
RESOURCES = {
    "calibrate": ("2", "4", "4G", "8G", 2, True),
    "allocate": ("4", "8", "8G", "16G", 1, True),
    "evaluate": ("2", "4", "4G", "8G", 2, False),
    "register": ("500m", "1", "1G", "2G", 3, False),
}
BACKOFF = "30s"


class Outputs(NamedTuple):
    calibration: Dataset
    sparse_model: Model
    evaluation: Artifact


def _configure(task, step: str, retries: bool):
    cpu, cpu_limit, memory, memory_limit, num_retries, cache = RESOURCES[step]
    task.set_cpu_request(cpu).set_cpu_limit(cpu_limit)
    task.set_memory_request(memory).set_memory_limit(memory_limit)
    task.set_caching_options(cache)
    if retries:
        task.set_retry(num_retries=num_retries, backoff_duration=BACKOFF, backoff_factor=2.0)
    return task


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
    ) -> Outputs:
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
        )
        _configure(cal, "calibrate", retries)
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
        )
        _configure(alloc, "allocate", retries)
        ev = evaluate(
            model=model,
            sparse_model=alloc.outputs["sparse_model"],
            data=data,
            weights=weights,
            task=task,
            samples=evaluation_samples,
            batch_size=eval_batch_size,
            tolerance=tolerance,
            image_size=image_size,
            image_mode=image_mode,
            device=device,
        )
        _configure(ev, "evaluate", retries)
        with dsl.If(ev.outputs["Output"] == True, name="approved"):  # noqa: E712 (a KFP condition, not a Python comparison)
            reg = register(
                sparse_model=alloc.outputs["sparse_model"],
                metrics=ev.outputs["metrics"],
                tolerance=tolerance,
                registry=registry,
                name=name,
            )
            _configure(reg, "register", retries)
        return Outputs(
            calibration=cal.outputs["calibration"],
            sparse_model=alloc.outputs["sparse_model"],
            evaluation=ev.outputs["evaluation"],
        )

    return sparsify


sparsify_pipeline = build()
