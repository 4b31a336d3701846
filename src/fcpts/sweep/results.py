"""The end of a sweep: the best feasible trial of the whole study, ``best.json``,
``allocate.json`` (a ``--config`` for ``fcpts allocate``), ``trials.json`` and the plot."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..sources import Sources
from .common import (
    ALLOCATE_FILE,
    ATTR_BASELINE,
    ATTR_DENSE,
    ATTR_METRIC,
    ATTR_PARENT_RUN,
    ATTR_SPLITS,
    BEST_FILE,
    DEFAULT_EXPERIMENT,
    FORMAT,
    PLOT_FILE,
    TRIALS_FILE,
    finite,
    say,
    tracking_uri_of,
)
from .mlflow_log import Tracker
from .objective import constraint_of, is_feasible, select_best
from .plot import plot_study
from .space import SweepSpec, swept
from .storage import first_line, load_sweep_study, open_storage, redact_url


def _counts(trials: Sequence[Any]) -> dict[str, int]:
    counts = {
        "total": len(trials),
        "complete": 0,
        "pruned": 0,
        "fail": 0,
        "running": 0,
        "waiting": 0,
    }
    for t in trials:
        key = t.state.name.lower()
        counts[key] = counts.get(key, 0) + 1
    counts["infeasible"] = sum(
        1 for t in trials if t.state.name == "COMPLETE" and not is_feasible(t)
    )
    return counts


def _trial_record(t: Any) -> dict[str, Any]:
    return {
        "number": t.number,
        "state": t.state.name,
        "value": finite(t.value),
        "feasible": is_feasible(t),
        "constraint": constraint_of(t),
        "baseline": bool(t.user_attrs.get(ATTR_BASELINE)),
        "params": dict(t.params),
        "intermediate": {str(k): finite(v) for k, v in sorted(t.intermediate_values.items())},
        "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "settings"},
        "retry_of": (t.system_attrs or {}).get("failed_trial"),
    }


def _settings_of(t: Any, spec: SweepSpec) -> dict[str, Any]:
    settings = t.user_attrs.get("settings")
    if settings is None:  # trials made before this attribute existed
        settings = {
            **spec.settings,
            **{k: t.params[k] for k in swept() if k in t.params},
            "seed": spec.seed,
        }
    return dict(settings)


def finish_sweep(
    storage: str,
    study_name: str,
    out_dir: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    plot: bool = True,
    ok: bool = True,
) -> dict[str, Any]:
    """Select the best feasible complete trial of the whole study and write
    ``best.json``, ``allocate.json``, ``trials.json`` and ``study.png`` to ``out_dir``; tag
    and close the MLflow parent run. Raises UserError (run more trials) when no trial qualifies."""

    from ..steps.common import write_json

    study, spec = load_sweep_study(open_storage(storage), storage, study_name)
    trials = study.get_trials(deepcopy=False)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = _counts(trials)
    best = select_best(trials)
    base_trials = [t for t in trials if t.user_attrs.get(ATTR_BASELINE)]
    base_done = select_best(base_trials) or next(
        (t for t in base_trials if t.state.name == "COMPLETE"), None
    )
    baseline: dict[str, Any] = {"value": None, "trial": None}
    if base_done is not None:
        baseline = {
            "value": finite(base_done.value),
            "trial": base_done.number,
            "score": base_done.params.get("score"),
            "params": _settings_of(base_done, spec),
            "feasible": is_feasible(base_done),
            "clipped_to_space": base_done.user_attrs.get("baseline_clipped", []),
            "description": "the fcpts library defaults (score wanda), with settings outside the "
            "searched ranges clipped into them, evaluated like every trial",
        }
    elif base_trials:
        baseline["note"] = f"the baseline trial ended {base_trials[-1].state.name}"
    else:
        baseline["note"] = "no baseline trial in this study"
    metric = study.user_attrs.get(ATTR_METRIC, "")
    dense = study.user_attrs.get(ATTR_DENSE)
    result: dict[str, Any] = {
        "format": FORMAT,
        "study": study_name,
        "storage": redact_url(storage),
        "model": spec.sources.model,
        "data": spec.sources.data,
        "target": spec.target,
        "method": "fcpts",
        "seed": spec.seed,
        "metric": metric,
        "higher_is_better": True,
        "objective_split": "validation",
        "splits": study.user_attrs.get(ATTR_SPLITS),
        "dense_value": finite(dense),
        "value": None,
        "trial": None,
        "score": None,
        "params": None,
        "baseline": baseline,
        "improvement_over_baseline": None,
        "trials": counts,
        "search_space": spec.space,
        "fixed_settings": spec.settings,
        "files": {
            "trials": TRIALS_FILE,
            "plot": PLOT_FILE if plot else None,
            "allocate_config": ALLOCATE_FILE,
        },
    }
    if best is not None:
        result.update(
            value=best.value,
            trial=best.number,
            score=best.params["score"],
            params=_settings_of(best, spec),
            achieved_sparsity=best.user_attrs.get("achieved_sparsity"),
            exact=best.user_attrs.get("exact"),
            seconds=best.user_attrs.get("seconds"),
        )
        if baseline.get("value") is not None:
            result["improvement_over_baseline"] = best.value - baseline["value"]
    write_json(
        out / TRIALS_FILE, {"study": study_name, "trials": [_trial_record(t) for t in trials]}
    )
    files = [out / TRIALS_FILE]
    if plot:
        try:
            plot_study(trials, out / PLOT_FILE, baseline.get("value"), metric, best)
            files.append(out / PLOT_FILE)
        except Exception as exc:  # a plot never costs the sweep's result
            say(f"warning: could not draw {PLOT_FILE}: {first_line(exc)}")
            result["files"]["plot"] = None
    uri = tracking_uri_of(tracking_uri)
    parent = study.user_attrs.get(ATTR_PARENT_RUN)
    if uri and parent:
        result["mlflow"] = {"tracking_uri": redact_url(uri), "parent_run_id": parent}
    if best is not None:
        write_json(out / ALLOCATE_FILE, allocate_config(result, spec))
        files.append(out / ALLOCATE_FILE)
        write_json(out / BEST_FILE, result)
        files.insert(0, out / BEST_FILE)
    if uri and parent:
        Tracker(uri, experiment).finish(parent, result, files, ok and best is not None)
    if best is None:
        raise UserError(
            f"study {study_name} has no feasible complete trial yet ({counts['complete']} complete, "
            f"{counts['infeasible']} of them off target, {counts['pruned']} pruned, "
            f"{counts['fail']} failed): run more trials (--trials N on the same --storage and --study)"
        )
    return result


def allocate_config(best: Mapping[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """A ``--config`` file for ``fcpts allocate`` that reproduces the best trial."""
    defaults = Sources(model=spec.sources.model)
    config: dict[str, Any] = {
        # the sources' fields that differ from their defaults, by their option names
        **{
            k: v
            for k, v in spec.sources.to_dict().items()
            if k == "model" or v != getattr(defaults, k)
        },
        "target": spec.target,
        "method": "fcpts",
        "score": best["score"],
        "seed": spec.seed,
        "settings": best["params"],
    }
    for key in ("calibration_samples", "batch_size"):
        value = getattr(spec, key)
        if value is not None:
            config[key] = value
    sel = spec.selection or {}
    for key in ("include", "exclude", "keep_dense"):
        if sel.get(key):
            config[key] = list(sel[key]) if not isinstance(sel[key], str) else [sel[key]]
    for key in ("min_sparsity", "max_sparsity"):
        if sel.get(key) is not None:
            config[key] = sel[key]
    if sel.get("bounds"):
        config["bounds"] = [f"{k}={lo}:{hi}" for k, (lo, hi) in dict(sel["bounds"]).items()]
    return config


def load_best(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``best.json`` (or the folder holding it)."""
    from ..steps.common import read_json

    p = Path(path)
    if p.is_dir():
        p = p / BEST_FILE
    data = read_json(p, "sweep result", "point to the --out folder of `fcpts sweep`")
    if data.get("format") != FORMAT or not isinstance(data.get("params"), dict):
        raise UserError(f"{p} is not an fcpts sweep result (format {data.get('format')!r})")
    return data


def best_settings(best: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(score, settings)`` of a sweep result, for ``sparsify``/``allocate``."""
    return str(best["score"]), dict(best["params"])
