"""Preparing a study (create or resume it, enqueue the baseline, open the MLflow parent
run) and running trials of it in one worker process."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from .common import (
    ATTR_BASELINE,
    ATTR_DENSE,
    ATTR_METRIC,
    ATTR_PARENT_RUN,
    ATTR_SPEC,
    ATTR_SPLITS,
    DEFAULT_EXPERIMENT,
    DEFAULT_GRACE,
    DEFAULT_HEARTBEAT,
    quiet_optuna,
    say,
    tracking_uri_of,
)
from .mlflow_log import Tracker
from .objective import Context, Objective, constraints_func, load_context, supports_set_constraint
from .space import SweepSpec, default_study_name, swept
from .storage import load_sweep_study, open_storage, redact_url


@dataclass
class Prepared:
    """A study ready for workers; ``context`` is the model and data loaded to check them,
    for a worker in this process to reuse."""

    study_name: str
    storage: str
    created: bool
    parent_run_id: str | None
    failed_stale: int
    running: int
    existing: int
    context: Context | None = field(default=None, repr=False, compare=False)


def prepare_study(
    spec: SweepSpec,
    storage: str,
    study_name: str | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    baseline: bool = True,
    device: str = "auto",
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
) -> Prepared:
    """Create the study (or reopen it: its configuration must match ``spec``), fail the
    trials whose heartbeat went stale, enqueue the baseline into a new study, and open the
    MLflow parent run when tracking. Loads the model and data once to check them."""
    import optuna

    from ..alloc import get_allocator

    study_name = study_name or default_study_name(spec.sources.model, spec.target)
    base_params, clipped = spec.search_space.baseline()
    # unknown or invalid fixed settings fail here, not in every trial
    get_allocator("fcpts", **spec.settings, **{k: base_params[k] for k in swept()})
    rdb = open_storage(storage, heartbeat_interval, grace_period)
    with quiet_optuna():
        try:
            existing = optuna.load_study(study_name=study_name, storage=rdb)
        except KeyError:
            existing = None
    if existing is not None:  # a cheap check before loading the model
        if existing.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise UserError(
                f"study {study_name} is not an fcpts sweep (it minimises): give another --study"
            )
        _check_same(existing, spec, storage)
    ctx = load_context(spec, device)  # checks model, data and selection before any trial
    with quiet_optuna():
        try:
            study = optuna.create_study(
                storage=rdb, study_name=study_name, direction="maximize", load_if_exists=False
            )
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            study = optuna.load_study(study_name=study_name, storage=rdb)
            created = False
    if created:
        study.set_user_attr(ATTR_SPEC, spec.to_dict())
        study.set_user_attr(ATTR_METRIC, ctx.metric)
        study.set_user_attr(ATTR_DENSE, ctx.value(ctx.net))
        study.set_user_attr(ATTR_SPLITS, ctx.splits)
        if baseline:
            study.enqueue_trial(
                base_params, user_attrs={ATTR_BASELINE: True, "baseline_clipped": clipped}
            )
    elif existing is None:  # created by another process since we looked
        _check_same(study, spec, storage)
    before = {t.number for t in study.get_trials(deepcopy=False) if t.state.name == "RUNNING"}
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    failed = sum(1 for t in trials if t.number in before and t.state.name == "FAIL")
    running = sum(1 for t in trials if t.state.name == "RUNNING")
    if failed:
        say(
            f"marked {failed} stale trial(s) FAIL (left RUNNING by a stopped worker); each is "
            "re-queued once with the same parameters"
        )
    if running:
        say(
            f"{running} trial(s) of study {study_name} are RUNNING: another worker's, or a killed "
            f"worker's whose heartbeat is not yet {grace_period} s old (they turn FAIL then)"
        )
    parent = None
    uri = tracking_uri_of(tracking_uri)
    if uri:
        parent = Tracker(uri, experiment).parent_run(study, spec, storage, created)
    return Prepared(
        study_name=study_name,
        storage=storage,
        created=created,
        parent_run_id=parent,
        failed_stale=failed,
        running=running,
        existing=len(trials),
        context=ctx,
    )


def _check_same(study: Any, spec: SweepSpec, storage: str) -> None:
    stored = study.user_attrs.get(ATTR_SPEC)
    if stored is None:
        raise UserError(
            f"study {study.study_name} in {redact_url(storage)} was not made by fcpts sweep "
            "(or is still being created): give another --study"
        )
    mine = spec.to_dict()
    for key in mine:
        if stored.get(key) != mine[key]:
            raise UserError(
                f"study {study.study_name} in {redact_url(storage)} was made with {key}="
                f"{json.dumps(stored.get(key))}, not {json.dumps(mine[key])}: rerun with the same "
                "options to resume it, or give another --study"
            )


def load_spec(storage: str, study_name: str) -> SweepSpec:
    """The configuration stored in a study made by :func:`prepare_study`."""
    return load_sweep_study(open_storage(storage), storage, study_name)[1]


def _sampler(seed: int, worker: int, existing: int, trials: int):
    import optuna

    n_startup = max(2, min(10, trials // 3 if trials else 10))
    kwargs: dict[str, Any] = {
        "seed": (int(seed) * 1_000_003 + worker * 7919 + existing * 104_729) % (2**31),
        "n_startup_trials": n_startup,
        "multivariate": True,
    }
    if not supports_set_constraint():
        kwargs["constraints_func"] = constraints_func
    with quiet_optuna():
        return optuna.samplers.TPESampler(**kwargs)


def run_worker(
    storage: str,
    study_name: str,
    n_trials: int,
    *,
    worker: int = 0,
    device: str = "auto",
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    threads: int | None = None,
    pruner_startup_trials: int = 3,
    pruner_warmup_steps: int | None = None,
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
    expected_trials: int | None = None,
    context: Context | None = None,
) -> int:
    """Run ``n_trials`` trials of a prepared study in this process; returns how many ran.

    Any number of workers, on any machines that reach the storage, may run at once.
    ``context`` (:attr:`Prepared.context`) spares this process loading the model again.
    ``pruner_warmup_steps`` defaults to two reporting windows.
    """

    if n_trials <= 0:
        return 0
    with torch_threads(threads):
        return _run_worker(
            storage,
            study_name,
            n_trials,
            worker=worker,
            device=device,
            tracking_uri=tracking_uri,
            experiment=experiment,
            pruner_startup_trials=pruner_startup_trials,
            pruner_warmup_steps=pruner_warmup_steps,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            expected_trials=expected_trials,
            context=context,
        )


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Use ``threads`` torch threads for the duration (None: leave as is)."""
    if not threads:
        yield
        return
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _run_worker(
    storage: str,
    study_name: str,
    n_trials: int,
    *,
    worker: int,
    device: str,
    tracking_uri: str | None,
    experiment: str,
    pruner_startup_trials: int,
    pruner_warmup_steps: int | None,
    heartbeat_interval: int,
    grace_period: int,
    expected_trials: int | None,
    context: Context | None,
) -> int:
    import optuna

    rdb = open_storage(storage, heartbeat_interval, grace_period)
    probe, spec = load_sweep_study(rdb, storage, study_name)
    if context is not None and context.serves(spec, device):
        ctx = context
    else:
        ctx = load_context(spec, device)
    existing = len(probe.get_trials(deepcopy=False))
    warmup = 2 * spec.report_every if pruner_warmup_steps is None else int(pruner_warmup_steps)
    pruner = optuna.pruners.MedianPruner(
        n_startup_trials=int(pruner_startup_trials),
        n_warmup_steps=warmup,
        interval_steps=1,
    )
    with quiet_optuna():
        study = optuna.load_study(
            study_name=study_name,
            storage=rdb,
            sampler=_sampler(spec.seed, worker, existing, expected_trials or n_trials),
            pruner=pruner,
        )
    callbacks = []
    uri = tracking_uri_of(tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT_RUN)
    if uri and parent:
        callbacks.append(Tracker(uri, experiment).trial_callback(parent))
    with quiet_optuna():
        study.optimize(Objective(ctx), n_trials=int(n_trials), callbacks=callbacks)
    return int(n_trials)
