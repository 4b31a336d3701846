"""The sweep pipeline: an Optuna study of the fcpts settings with parallel workers, then
calibrate -> allocate with the best settings -> evaluate -> register (if approved).

    sweep-prepare -> ParallelFor(workers): sweep-worker -> sweep-best
        -> calibrate (score = the best trial's) -> allocate (settings = the best trial's)
        -> evaluate -> register under dsl.If on the approval gate

``sweep-prepare`` creates (or resumes) the study in ``storage``, a SQLAlchemy URL that
every worker pod reaches (``postgresql+psycopg2://user:password@host/db``; leave it empty
on a cluster and the steps read ``FCPTS_OPTUNA_STORAGE`` from the Kubernetes secret
fcpts-optuna-db, so the password is no pipeline parameter), stores the
study's configuration in it and returns the worker indices; ``dsl.ParallelFor`` starts
one ``sweep-worker`` per index, each running its share of ``trials`` on the shared study.
``sweep-best`` waits for all of them (``.after`` the loop), selects the best feasible
trial of the whole study and writes best.json; its ``score`` and ``settings`` feed the
reused calibrate and allocate components of the sparsify pipeline, and evaluate/register
follow as there. The final evaluation uses the evaluation split, disjoint from both the
calibration split the trials learn on and the validation split they are scored on.

The sweep steps are never cached (they change the study); calibrate and allocate are, as
in the sparsify pipeline. Compile with :func:`compile_sweep`. On one machine the
pipeline runs in KFP's local SubprocessRunner (kfp 2.17 runs ``dsl.ParallelFor`` there,
iterations in parallel threads) with ``storage="sqlite:///<absolute path>"``.

``tracking_uri`` serves both halves: the sweep's own MLflow runs, and the MLflow run of
the final calibrate -> allocate -> evaluate -> register (in ``experiment``, under
``pipeline_run_id`` or the KFP run's id, as in the sparsify pipeline).
"""

import inspect
from dataclasses import dataclass
from typing import Annotated, NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Model

from components.sweep.component import sweep_best, sweep_prepare, sweep_worker
from fcpts.settings import Opt, declared
from fcpts.steps.options import ClusterOptions
from pipelines.common import KFP_TYPES, STEP_RESOURCES, chain, configure, pipeline, step_task
from pipelines.common import pipeline_parameters as step_parameters
from pipelines.k8s import cluster_options

PIPELINE_NAME = "fcpts-sweep"
STEPS = ("calibrate", "allocate", "evaluate", "register")
DEFAULTS = {"model": "demo:minilm"}

# (cpu request, cpu limit, memory request, memory limit, retries, caching)
RESOURCES = {
    "sweep-prepare": ("1", "2", "4G", "8G", 2, False),
    "sweep-worker": ("4", "8", "8G", "16G", 1, False),
    "sweep-best": ("500m", "1", "2G", "4G", 2, False),
    **STEP_RESOURCES,
}


@dataclass(frozen=True)
class SweepParameters:
    """The sweep pipeline's own parameters (the rest are the steps')."""

    storage: Annotated[
        str, Opt("the study's SQLAlchemy URL (empty: FCPTS_OPTUNA_STORAGE from the secret)")
    ] = ""
    study: Annotated[str, Opt("study name; the same storage and name resume it")] = "fcpts-sweep"
    trials: Annotated[int, Opt("trials to run, shared by the workers")] = 20
    workers: Annotated[int, Opt("parallel worker pods")] = 2
    space: Annotated[
        str, Opt('search ranges as a JSON object, e.g. {"iters": "50:200"} (empty: declared)')
    ] = ""
    validation_samples: Annotated[int, Opt("validation samples each trial is scored on")] = 0
    report_every: Annotated[int, Opt("pruner checkpoint spacing, in iterations")] = 20
    threads: Annotated[int, Opt("torch threads per worker (0: the pod's cores)")] = 0
    grace: Annotated[int, Opt("seconds without heartbeat before a trial is re-queued")] = 60


class Outputs(NamedTuple):
    sweep: Artifact
    calibration: Dataset
    sparse_model: Model
    evaluation: Artifact


def parameters() -> list[inspect.Parameter]:
    own = [
        inspect.Parameter(
            s.name,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=s.default,
            annotation=KFP_TYPES[{bool: "bool", int: "int", float: "float"}.get(s.type, "str")],
        )
        for s in declared(SweepParameters)
    ]
    # the best trial's score and the fcpts method are not parameters of this pipeline
    return own + step_parameters(STEPS, DEFAULTS, skip=("score", "method"))


def given(component, params: dict) -> dict:
    """The pipeline parameters a sweep component takes, by its own input names."""
    return {k: params[k] for k in component.component_spec.inputs if k in params}


def build(retries: bool = True, cluster: ClusterOptions | None = None):
    """The pipeline; ``retries=False`` drops the retry policies (local runs); ``cluster``:
    the image, accelerators and checkpoint volume (pipelines/k8s.py)."""
    c = cluster_options(cluster)

    def body(p):
        prep = step_task(sweep_prepare, "sweep-prepare", c, **given(sweep_prepare, p))
        configure(prep, "sweep-prepare", retries, RESOURCES, c)
        with dsl.ParallelFor(prep.output, name="workers") as worker:
            work = step_task(
                sweep_worker, "sweep-worker", c, worker=worker, **given(sweep_worker, p)
            )
            configure(work, "sweep-worker", retries, RESOURCES, c)
        best = step_task(sweep_best, "sweep-best", c, **given(sweep_best, p)).after(work)
        configure(best, "sweep-best", retries, RESOURCES, c)
        score, settings = best.outputs["score"], best.outputs["settings"]
        cal, alloc, ev = chain(
            p,
            retries,
            RESOURCES,
            overrides={
                "calibrate": {"score": score},
                "allocate": {"method": "fcpts", "score": score, "settings": settings},
            },
            cluster=c,
        )
        return Outputs(
            sweep=best.outputs["sweep"],
            calibration=cal.outputs["calibration"],
            sparse_model=alloc.outputs["sparse_model"],
            evaluation=ev.outputs["evaluation"],
        )

    return pipeline(
        PIPELINE_NAME,
        "fcpts sweep: parallel Optuna workers share one study of the fcpts settings; the best "
        "feasible settings are allocated, evaluated and gated.",
        parameters(),
        body,
        Outputs,
    )


sweep_pipeline = build()


def compile_sweep(path: str) -> str:
    """Write the sweep pipeline as KFP v2 YAML to ``path``; returns the path."""
    compiler.Compiler().compile(sweep_pipeline, str(path))
    return str(path)
