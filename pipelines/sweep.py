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

from typing import NamedTuple

from kfp import compiler, dsl
from kfp.dsl import Artifact, Dataset, Model

from components.allocate.component import allocate
from components.calibrate.component import calibrate
from components.sweep.component import sweep_best, sweep_prepare, sweep_worker
from pipelines.common import STEP_RESOURCES, configure, evaluate_and_register, tracking_args

PIPELINE_NAME = "fcpts-sweep"

# (cpu request, cpu limit, memory request, memory limit, retries, caching)
RESOURCES = {
    "sweep-prepare": ("1", "2", "4G", "8G", 2, False),
    "sweep-worker": ("4", "8", "8G", "16G", 1, False),
    "sweep-best": ("500m", "1", "2G", "4G", 2, False),
    **STEP_RESOURCES,
}


class Outputs(NamedTuple):
    sweep: Artifact
    calibration: Dataset
    sparse_model: Model
    evaluation: Artifact


def build(retries: bool = True):
    """The pipeline function; ``retries=False`` drops the retry policies (local runs)."""

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="fcpts sweep: parallel Optuna workers share one study of the fcpts "
        "settings; the best feasible settings are allocated, evaluated and gated.",
    )
    def sweep(
        storage: str = "",
        model: str = "demo:minilm",
        study: str = "fcpts-sweep",
        target: float = 0.5,
        trials: int = 20,
        workers: int = 2,
        data: str = "",
        weights: str = "",
        task: str = "auto",
        space: str = "",
        settings: str = "{}",
        selection: str = "",
        calibration_samples: int = 0,
        batch_size: int = 0,
        validation_samples: int = 0,
        eval_batch_size: int = 0,
        evaluation_samples: int = 0,
        report_every: int = 20,
        seed: int = 0,
        tolerance: float = 0.05,
        registry: str = "",
        name: str = "",
        image_size: int = 0,
        image_mode: str = "RGB",
        tracking_uri: str = "",
        device: str = "auto",
        threads: int = 0,
        grace: int = 60,
        experiment: str = "fcpts",
        pipeline_run_id: str = "",
    ) -> Outputs:
        tracking = tracking_args(tracking_uri, experiment, pipeline_run_id)
        prep = sweep_prepare(
            model=model,
            storage=storage,
            study=study,
            target=target,
            workers=workers,
            data=data,
            weights=weights,
            task=task,
            space=space,
            settings=settings,
            selection=selection,
            calibration_samples=calibration_samples,
            batch_size=batch_size,
            validation_samples=validation_samples,
            eval_batch_size=eval_batch_size,
            report_every=report_every,
            seed=seed,
            image_size=image_size,
            image_mode=image_mode,
            tracking_uri=tracking_uri,
            device=device,
            grace=grace,
        )
        configure(prep, "sweep-prepare", retries, RESOURCES)
        with dsl.ParallelFor(prep.output, name="workers") as worker:
            work = sweep_worker(
                storage=storage,
                study=study,
                worker=worker,
                workers=workers,
                trials=trials,
                tracking_uri=tracking_uri,
                device=device,
                threads=threads,
                grace=grace,
            )
            configure(work, "sweep-worker", retries, RESOURCES)
        best = sweep_best(storage=storage, study=study, tracking_uri=tracking_uri).after(work)
        configure(best, "sweep-best", retries, RESOURCES)
        cal = calibrate(
            model=model,
            data=data,
            weights=weights,
            task=task,
            score=best.outputs["score"],
            samples=calibration_samples,
            batch_size=batch_size,
            seed=seed,
            selection=selection,
            image_size=image_size,
            image_mode=image_mode,
            device=device,
            **tracking,
        )
        configure(cal, "calibrate", retries, RESOURCES)
        alloc = allocate(
            calibration=cal.outputs["calibration"],
            target=target,
            method="fcpts",
            score=best.outputs["score"],
            settings=best.outputs["settings"],
            selection=selection,
            seed=seed,
            device=device,
            **tracking,
        )
        configure(alloc, "allocate", retries, RESOURCES)
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
            sweep=best.outputs["sweep"],
            calibration=cal.outputs["calibration"],
            sparse_model=alloc.outputs["sparse_model"],
            evaluation=ev.outputs["evaluation"],
        )

    return sweep


sweep_pipeline = build()


def compile_sweep(path: str) -> str:
    """Write the sweep pipeline as KFP v2 YAML to ``path``; returns the path."""
    compiler.Compiler().compile(sweep_pipeline, str(path))
    return str(path)
