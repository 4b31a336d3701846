"""``run_sweep``: prepare the study, run its trials in one or several local worker
processes, and finish (``best.json``)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FcptsError, UserError
from .common import BEST_FILE, DEFAULT_EXPERIMENT, DEFAULT_GRACE, DEFAULT_HEARTBEAT, tracking_uri_of
from .mlflow_log import Tracker
from .results import finish_sweep
from .space import SweepSpec
from .storage import storage_url
from .worker import prepare_study, run_worker, torch_threads


@dataclass
class SweepResult:
    path: Path
    best: dict[str, Any]
    study_name: str
    storage: str

    @property
    def score(self) -> str:
        return self.best["score"]

    @property
    def params(self) -> dict[str, Any]:
        return self.best["params"]


def trial_shares(trials: int, workers: int) -> list[int]:
    """``trials`` split over ``workers`` as evenly as possible."""
    return [trials // workers + (1 if i < trials % workers else 0) for i in range(workers)]


def _worker_main(kwargs: dict[str, Any]) -> None:
    """Entry point of a spawned worker process."""
    try:
        run_worker(**kwargs)
    except UserError as exc:
        print(f"fcpts sweep worker {kwargs.get('worker')}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run_sweep(
    spec: SweepSpec,
    trials: int = 20,
    storage: str | os.PathLike | None = None,
    study_name: str | None = None,
    workers: int = 1,
    out_dir: str | os.PathLike = "sweep",
    tracking_uri: str | None = None,
    *,
    pruner_startup_trials: int = 3,
    pruner_warmup_steps: int | None = None,
    baseline: bool = True,
    device: str = "auto",
    threads: int | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    heartbeat_interval: int = DEFAULT_HEARTBEAT,
    grace_period: int = DEFAULT_GRACE,
    plot: bool = True,
) -> SweepResult:
    """Run ``trials`` more trials of the study of ``spec`` (the sources, target, search
    space and fixed settings; created on first use, resumed after) with ``workers``
    processes, then write ``out_dir/best.json`` for the whole study.

    ``storage``: None for ``out_dir/study.db`` (SQLite), a path to a SQLite file, or a
    SQLAlchemy URL; ``workers > 1`` spawns processes that share the study through it
    (SQLite suits a few local workers; use PostgreSQL across machines).
    ``tracking_uri`` (default ``$MLFLOW_TRACKING_URI``; none: no MLflow).
    """
    trials = int(trials)
    workers = int(workers)
    if trials < 0:
        raise UserError(f"--trials must be >= 0, got {trials}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    url = storage_url(storage, out_dir)
    uri = tracking_uri_of(tracking_uri)
    with torch_threads(threads):
        prepared = prepare_study(
            spec,
            url,
            study_name,
            tracking_uri=uri or "",
            experiment=experiment,
            baseline=baseline,
            device=device,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
        )
    common = {
        "storage": url,
        "study_name": prepared.study_name,
        "device": device,
        "tracking_uri": uri or "",
        "experiment": experiment,
        "pruner_startup_trials": pruner_startup_trials,
        "pruner_warmup_steps": pruner_warmup_steps,
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "expected_trials": trials,
    }
    ok = False
    try:
        if workers == 1:
            with torch_threads(threads):
                run_worker(n_trials=trials, worker=0, context=prepared.context, **common)
        else:
            _run_processes(common, trial_shares(trials, workers), threads)
        ok = True
    finally:
        if not ok and uri and prepared.parent_run_id:
            with contextlib.suppress(Exception):
                tracker = Tracker(uri, experiment)
                tracker.store.call(
                    "close the sweep run",
                    tracker.client.set_terminated,
                    prepared.parent_run_id,
                    "FAILED",
                )
    best = finish_sweep(
        url, prepared.study_name, out_dir, tracking_uri=uri or "", experiment=experiment, plot=plot
    )
    return SweepResult(
        path=Path(out_dir) / BEST_FILE, best=best, study_name=prepared.study_name, storage=url
    )


def _run_processes(common: dict[str, Any], shares: list[int], threads: int | None) -> None:
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // len(shares))
    ctx = multiprocessing.get_context("spawn")
    procs = []
    for i, n in enumerate(shares):
        if n <= 0:
            continue
        kwargs = dict(common, n_trials=n, worker=i, threads=threads)
        p = ctx.Process(target=_worker_main, args=(kwargs,), name=f"fcpts-sweep-worker-{i}")
        p.start()
        procs.append((i, p))
    failed = []
    try:
        for i, p in procs:
            p.join()
            if p.exitcode != 0:
                failed.append((i, p.exitcode))
    except BaseException:
        for _, p in procs:
            if p.is_alive():
                p.terminate()
        for _, p in procs:
            p.join(timeout=10)
        raise
    if failed:
        i, code = failed[0]
        error = UserError if code == 2 else FcptsError
        raise error(
            f"sweep worker {i} failed (exit code {code}; its error is printed above); the "
            "study keeps every finished trial: rerun to resume"
        )
