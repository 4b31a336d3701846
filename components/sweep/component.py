"""sweep: an Optuna study of the fcpts settings shared by parallel workers.

Three components, run in this order by ``pipelines/sweep.py``:

* ``sweep_prepare``: create (or resume) the study in the RDB storage, store its
  configuration in it, enqueue the baseline, open the MLflow parent run; returns the
  worker indices that ``dsl.ParallelFor`` fans out over.
* ``sweep_worker``: run this worker's share of the trials on the shared study.
* ``sweep_best``: select the best feasible trial of the whole study, write best.json
  (and allocate.json, trials.json, study.png) and return the score and the settings JSON
  that the allocate component takes.
"""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from .. import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_prepare(
    model: str,
    storage: str,
    study: str,
    target: float,
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
    report_every: int = 20,
    seed: int = 0,
    image_size: int = 0,
    image_mode: str = "RGB",
    tracking_uri: str = "",
    device: str = "auto",
    grace: int = 60,
) -> list:
    """Create or resume the study ``study`` in ``storage`` (a SQLAlchemy URL every worker
    reaches, e.g. postgresql+psycopg2://user:pw@host/db) and return the worker indices
    0..workers-1. ``space`` is a JSON object of search ranges ({"iters": "50:200"});
    ``settings`` fixes other fcpts settings; empty strings and zeros mean defaults.
    """
    inputs = dict(locals())
    import json

    from fcpts.errors import UserError
    from fcpts.steps import settings_from_json
    from fcpts.steps.entry import sources as kfp_sources
    from fcpts.steps.entry import tracking_uri as tracked_to
    from fcpts.sweep import SearchSpace, SweepSpec, prepare_study, shared_storage

    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if not study.strip():
        raise UserError("give the study a name: every worker opens it by that name")
    spec = SweepSpec(
        sources=kfp_sources(inputs),
        target=target,
        seed=seed,
        calibration_samples=calibration_samples or None,
        batch_size=batch_size or None,
        validation_samples=validation_samples or None,
        eval_batch_size=eval_batch_size or None,
        selection=json.loads(selection) if selection else {},
        settings=settings_from_json(settings),
        space=SearchSpace.from_overrides(json.loads(space) if space else None).to_dict(),
        report_every=report_every,
    )
    prepared = prepare_study(
        spec,
        shared_storage(storage),
        study,
        tracking_uri=tracked_to(tracking_uri),
        device=device,
        heartbeat_interval=max(1, grace // 4),
        grace_period=grace,
    )
    print(
        f"study {prepared.study_name}: {prepared.existing} trials so far"
        + (", created" if prepared.created else ", resumed"),
        flush=True,
    )
    return list(range(workers))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_worker(
    storage: str,
    study: str,
    worker: int,
    workers: int,
    trials: int,
    tracking_uri: str = "",
    device: str = "auto",
    threads: int = 0,
    grace: int = 60,
) -> int:
    """Run worker ``worker``'s share of ``trials`` (split evenly over ``workers``) on the
    shared study; returns how many trials it ran."""
    from fcpts.steps.entry import tracking_uri as tracked_to
    from fcpts.sweep import run_worker, shared_storage, trial_shares

    n = trial_shares(trials, workers)[worker]
    run_worker(
        shared_storage(storage),
        study,
        n,
        worker=worker,
        device=device,
        tracking_uri=tracked_to(tracking_uri),
        threads=threads or None,
        heartbeat_interval=max(1, grace // 4),
        grace_period=grace,
        expected_trials=trials,
    )
    print(f"worker {worker} ran {n} trials", flush=True)
    return n


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def sweep_best(
    storage: str,
    study: str,
    sweep: Output[Artifact],
    tracking_uri: str = "",
) -> NamedTuple("Best", [("score", str), ("settings", str), ("value", float)]):
    """Select the best feasible complete trial of the study and write the sweep folder
    (best.json, allocate.json, trials.json, study.png); return its score, its fcpts
    settings as JSON (the allocate component's ``settings``) and its validation value."""
    import json
    from collections import namedtuple

    from fcpts.steps.entry import tracking_uri as tracked_to
    from fcpts.sweep import finish_sweep, shared_storage

    best = finish_sweep(
        shared_storage(storage), study, sweep.path, tracking_uri=tracked_to(tracking_uri)
    )
    sweep.metadata.update(
        {
            "value": best["value"],
            "trial": best["trial"],
            "score": best["score"],
            "baseline_value": best["baseline"].get("value"),
            "trials": best["trials"]["total"],
        }
    )
    Best = namedtuple("Best", ["score", "settings", "value"])
    return Best(best["score"], json.dumps(best["params"]), float(best["value"]))
