"""``study.png``: optuna's optimisation history (left; infeasible trials greyed by optuna
from the trials' constraints, the defaults' baseline and the best trial marked) and its
parameter importances over the feasible trials (right), side by side in one PNG."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import quiet_optuna
from .objective import is_feasible


def study_of(trials: Sequence[Any]) -> Any:
    """An in-memory maximising study holding copies of ``trials`` (what optuna's plots take)."""
    import optuna

    study = optuna.create_study(direction="maximize")
    study.add_trials(list(trials))
    return study


def feasible_complete(trials: Sequence[Any]) -> list[Any]:
    return [
        t
        for t in trials
        if t.state.name == "COMPLETE"
        and t.value is not None
        and math.isfinite(t.value)
        and is_feasible(t)
    ]


def history_axes(trials: Sequence[Any], baseline: float | None, metric: str, best: Any) -> Any:
    from optuna.visualization.matplotlib import plot_optimization_history

    ax = plot_optimization_history(study_of(trials), target_name=f"validation {metric}".strip())
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="tab:green", label="baseline (defaults)")
    if best is not None:
        ax.scatter(
            [best.number], [best.value], s=160, facecolors="none", edgecolors="black", label="best"
        )
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return ax


def importance_axes(feasible: Sequence[Any]) -> Any:
    """optuna's importances of the feasible trials; with fewer than two, a panel saying so."""
    if len(feasible) >= 2:
        from optuna.visualization.matplotlib import plot_param_importances

        return plot_param_importances(study_of(feasible))
    import matplotlib.pyplot as plt

    _, ax = plt.subplots()
    ax.text(
        0.5,
        0.5,
        f"parameter importances need >= 2 feasible complete trials\n(have {len(feasible)})",
        ha="center",
        va="center",
        transform=ax.transAxes,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("Hyperparameter Importances")
    return ax


def pixels(figure: Any) -> Any:
    """A drawn figure as an RGBA array."""
    import numpy as np

    figure.tight_layout()
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())


def plot_study(
    trials: Sequence[Any],
    path: str | os.PathLike,
    baseline: float | None = None,
    metric: str = "",
    best: Any | None = None,
) -> Path:
    """Optimisation history (left) and parameter importances (right) as one PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # "no complete trials": the panel says so
    try:
        with quiet_optuna(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty legend
            panels = [
                history_axes(trials, baseline, metric, best),
                importance_axes(feasible_complete(trials)),
            ]
    finally:
        optuna.logging.set_verbosity(verbosity)
    images = []
    for ax in panels:
        ax.figure.set_size_inches(6, 4.5)
        images.append(pixels(ax.figure))
        plt.close(ax.figure)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.imsave(path, np.hstack(images), format="png")
    return path
