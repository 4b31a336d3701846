"""Hyperparameter sweeps of the fcpts allocator with Optuna.

One study searches the fcpts settings declared with a search range (``fcpts.alloc.fcpts``,
see :func:`fcpts.sweep.space.searched_settings`) and the importance score (magnitude or
wanda) for one model, one target and one data source. The objective is the task metric of the
sparse model on the **validation** split (top-1 for classifiers, mean cosine to the dense
embeddings for encoders, minus the relative output MSE for anything else: higher is
better), disjoint from the calibration split the allocator learns on and from the
evaluation split that ``fcpts evaluate`` reports on.

* **Exact target as a constraint.** Every trial records ``|zeros - round(S x N)| / N`` as
  the constraint ``exact_target`` (``Trial.set_constraint``, which TPESampler reads; on
  Optuna < 5 through ``TPESampler(constraints_func=...)``) and as the user attribute
  ``constraint``. A trial with a value above 0 is infeasible: the sampler ranks it below
  every feasible trial, and :func:`select_best` never returns it (the best trial is picked
  here among feasible COMPLETE trials, not taken from ``study.best_trial``).
* **Pruning.** At checkpoints a trial reports minus the mean reconstruction loss of the
  last window (``trial.report``, higher is better like the objective); a
  :class:`~optuna.pruners.MedianPruner` stops trials that fall below the median of earlier
  trials at the same checkpoint. A run of the shortest searched length reports every
  ``report_every`` iterations; longer runs report at the same fractions of their length
  (:func:`~fcpts.sweep.objective.checkpoints`), where the cosine schedule makes their
  losses comparable. The baseline trial is never pruned.
* **Baseline.** The library's default settings (score ``wanda``, as ``score="auto"`` picks
  with data; ``iters`` clipped to the searched range so both run on the same budget) are
  enqueued as the study's first trial, evaluated on the same validation split.
* **Storage.** A SQLite file ``<out>/study.db`` by default, or any SQLAlchemy URL
  (``postgresql+psycopg2://user@host/db``) for workers on several machines sharing one
  study. The study records its own configuration (model, data, target, search space ...),
  so a worker needs only the storage and the study name, and a study reopened with
  different options is refused. Trials carry a heartbeat: a trial left RUNNING by a
  killed process is marked FAIL once its heartbeat is older than the grace period (on
  resume, and whenever a worker starts a trial) and re-queued once with the same
  parameters. Trial numbers continue across resumptions.
* **MLflow** (optional: only with a tracking URI or ``$MLFLOW_TRACKING_URI``): one parent
  run per study (reopened on resume), one nested run per finished trial with its params,
  value, state and reconstruction curve; the best trial's settings tagged on the parent
  (``best.<name>``) with ``best.json`` and the study plot as artifacts.
* **Output** (``out_dir``): ``best.json`` (value, params = the fcpts settings dict, score,
  trial, baseline, dense value, trial counts), ``allocate.json`` (a ``--config`` file for
  ``fcpts allocate`` with the best settings), ``trials.json`` and ``study.png``
  (optimisation history and parameter importances).

Entry points: :func:`run_sweep` (prepare, run ``workers`` processes, finish) and its three
parts :func:`prepare_study`, :func:`run_worker` and :func:`finish_sweep`, which the Kubeflow
pipeline (``pipelines/sweep.py``) runs as separate steps.

Modules: ``space`` (SearchSpace, SweepSpec), ``storage`` (URLs, RDBStorage), ``objective``
(Context, Objective, constraints, select_best), ``mlflow_log`` (parent and nested runs),
``worker`` (prepare_study, run_worker), ``results`` (finish_sweep, best.json,
allocate.json), ``plot`` (study.png), ``run`` (run_sweep and local worker processes).
"""

from __future__ import annotations

from ..errors import FcptsError, ServiceError, UserError
from .common import (
    ALLOCATE_FILE,
    ATTR_BASELINE,
    ATTR_CONSTRAINT,
    ATTR_DENSE,
    ATTR_METRIC,
    ATTR_PARENT_RUN,
    ATTR_SPEC,
    ATTR_SPLITS,
    BEST_FILE,
    CONSTRAINT,
    DEFAULT_EXPERIMENT,
    DEFAULT_GRACE,
    DEFAULT_HEARTBEAT,
    FORMAT,
    PLOT_FILE,
    STUDY_DB,
    TRIALS_FILE,
)
from .objective import Context, Objective, constraint_of, is_feasible, landing_gap, select_best
from .plot import plot_study
from .results import allocate_config, best_settings, finish_sweep, load_best
from .run import SweepResult, run_sweep, trial_shares
from .space import SCORES, SearchSpace, SweepSpec, default_study_name, swept
from .storage import RDB_SCHEMES, open_storage, redact_url, shared_storage, storage_url
from .worker import Prepared, load_spec, prepare_study, run_worker, torch_threads

__all__ = [
    "ALLOCATE_FILE",
    "ATTR_BASELINE",
    "ATTR_CONSTRAINT",
    "ATTR_DENSE",
    "ATTR_METRIC",
    "ATTR_PARENT_RUN",
    "ATTR_SPEC",
    "ATTR_SPLITS",
    "BEST_FILE",
    "CONSTRAINT",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_GRACE",
    "DEFAULT_HEARTBEAT",
    "FORMAT",
    "PLOT_FILE",
    "RDB_SCHEMES",
    "SCORES",
    "STUDY_DB",
    "swept",
    "TRIALS_FILE",
    "Context",
    "FcptsError",
    "Objective",
    "Prepared",
    "SearchSpace",
    "ServiceError",
    "SweepResult",
    "SweepSpec",
    "UserError",
    "allocate_config",
    "best_settings",
    "constraint_of",
    "default_study_name",
    "finish_sweep",
    "is_feasible",
    "landing_gap",
    "load_best",
    "load_spec",
    "open_storage",
    "plot_study",
    "prepare_study",
    "redact_url",
    "run_sweep",
    "run_worker",
    "select_best",
    "shared_storage",
    "storage_url",
    "torch_threads",
    "trial_shares",
]
