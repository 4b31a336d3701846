"""``fcpts register --from``: log and register a result that stayed on disk.

When the tracking store does not answer, a step still writes its output folder and then
fails (see :mod:`fcpts.steps.tracked`). :func:`register_from` picks such a result up
later: it reads the sparse model folder and the evaluation folder, opens the pipeline's
MLflow run by the pipeline run id recorded in them, logs what the run lacks (the
allocation, the evaluation and the sparse model), and registers it through the register
step. Registering is idempotent by the MLflow run, so running it twice, or on a run that
was complete, creates no second version.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..sparse_model import MANIFEST_FILE, read_manifest
from ..tracking.names import (
    CURVE_PREFIX,
    METRIC_ACHIEVED,
    METRIC_SPARSE,
    TAG_BACKFILLED,
    TAG_MODEL_URI,
)
from .common import input_folder, is_remote, read_json
from .evaluate import METRICS_FILE
from .register import Registration, Registry, register
from .tracked import Tracking, finish_step, log_allocation, log_evaluation

RUN_LAYOUT = (Path("allocate") / "sparse_model", Path("evaluate") / "evaluation")
HINT = (
    "give the folder of one `fcpts run` (it holds allocate/sparse_model and "
    "evaluate/evaluation) or the --out folder of `fcpts evaluate`"
)


def find_result(path: str | os.PathLike) -> tuple[Path, Path]:
    """(sparse model folder, evaluation folder) of a run folder or an evaluation folder."""
    root = input_folder(path) if is_remote(path) else Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"--from {path}: no such folder; {HINT}")
    sparse_dir, eval_dir = (root / p for p in RUN_LAYOUT)
    if (sparse_dir / MANIFEST_FILE).is_file() and (eval_dir / METRICS_FILE).is_file():
        return sparse_dir, eval_dir
    if (root / METRICS_FILE).is_file():
        metrics = read_json(root / METRICS_FILE, "metrics file", HINT)
        named_ref = str((metrics.get("sparse_model") or {}).get("path") or "")
        named = input_folder(named_ref) if is_remote(named_ref) else Path(named_ref)
        if named_ref and (named / MANIFEST_FILE).is_file():
            return named, root
        raise UserError(
            f"--from {path}: its metrics.json names the sparse model folder {named}, which has "
            "no manifest.json; give the run folder instead"
        )
    raise UserError(f"--from {path}: no result there (no metrics.json, no evaluate/); {HINT}")


def _rebuild(manifest: dict[str, Any], metrics: dict[str, Any], sparse_dir: Path) -> dict[str, Any]:
    """The sparse model, the evaluation batches, the task and the data source, rebuilt from
    the sources and the split recorded in the manifest and the metrics."""
    from ..sources import Sources, make_task, resolve_data, resolve_model
    from ..sparse_model import load_sparse

    evaluation = metrics.get("evaluation") or {}
    recorded = dict(manifest.get("sources") or {})
    if not evaluation.get("same_data_as_calibration", True):
        recorded["data"] = evaluation.get("data")
    sources = Sources.from_dict(recorded)
    model = resolve_model(sources.model, sources.weights)
    sparse_net, _ = load_sparse(model.model, sparse_dir)
    data = resolve_data(sources, model)
    batches = data.split(
        "evaluation",
        int(evaluation["samples"]),
        int(evaluation["batch_size"]),
        int(evaluation.get("seed", 0)),
    )
    return {
        "sparse_net": sparse_net.eval(),
        "batches": batches,
        "task": make_task(metrics.get("task") or manifest["task"]),
        "data_source": data.source,
        "folder": sparse_dir,
    }


def register_from(
    path: str | os.PathLike,
    out_dir: str | os.PathLike | None,
    *,
    tolerance: float,
    tracking: Tracking,
    name: str | None = None,
    registry: str | Registry | None = None,
) -> Registration:
    """Complete the MLflow run of the result in ``path`` and register it (see the module
    docstring). ``out_dir`` defaults to ``<path>/register/decision``."""
    sparse_dir, eval_dir = find_result(path)
    metrics = read_json(eval_dir / METRICS_FILE, "metrics file", HINT)
    manifest = read_manifest(sparse_dir)
    tracking = tracking.resolve(metrics, manifest)
    run = tracking.open()
    have = run.store.call("read the run", run.client.get_run, run.run_id).data
    if METRIC_ACHIEVED not in have.metrics:
        log_allocation(run, sparse_dir, curves=f"{CURVE_PREFIX}/loss" not in have.metrics)
        run.set_tags({TAG_BACKFILLED + "allocate": "true"})
        finish_step(run, "allocate", manifest.get("step_seconds") or 0.0)
    if METRIC_SPARSE not in have.metrics or TAG_MODEL_URI not in have.tags:
        log_evaluation(
            run,
            eval_dir,
            metrics,
            model=TAG_MODEL_URI not in have.tags,
            **_rebuild(manifest, metrics, sparse_dir),
        )
        run.set_tags({TAG_BACKFILLED + "evaluate": "true"})
        finish_step(run, "evaluate", metrics.get("step_seconds") or 0.0)
    if out_dir:
        out: str | Path = out_dir
    elif is_remote(path):
        out = f"{str(path).rstrip('/')}/register/decision"
    else:
        out = Path(path) / "register" / "decision"
    return register(
        eval_dir / METRICS_FILE,
        sparse_dir,
        out,
        tolerance=tolerance,
        registry=registry,
        name=name,
        tracking=tracking,
    )
