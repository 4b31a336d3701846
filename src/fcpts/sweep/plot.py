"""``study.png``: the optimisation history and the parameter importances."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import quiet_optuna
from .objective import is_feasible


def plot_study(
    trials: Sequence[Any],
    path: str | os.PathLike,
    baseline: float | None = None,
    metric: str = "",
    best: Any | None = None,
) -> Path:
    """Optimisation history (left) and parameter importances (right) as a PNG. The
    importances need at least two feasible complete trials; with fewer, the panel says so."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    complete = [
        t
        for t in trials
        if t.state.name == "COMPLETE" and t.value is not None and math.isfinite(t.value)
    ]
    feasible = [t for t in complete if is_feasible(t)]
    infeasible = [t for t in complete if not is_feasible(t)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if feasible:
        ax.scatter(
            [t.number for t in feasible],
            [t.value for t in feasible],
            label="feasible",
            color="tab:blue",
            zorder=3,
        )
        running, xs, ys = -math.inf, [], []
        for t in sorted(feasible, key=lambda t: t.number):
            running = max(running, t.value)
            xs.append(t.number)
            ys.append(running)
        ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    if infeasible:
        ax.scatter(
            [t.number for t in infeasible],
            [t.value for t in infeasible],
            marker="x",
            color="tab:red",
            label="off target (infeasible)",
            zorder=3,
        )
    pruned = [t.number for t in trials if t.state.name == "PRUNED"]
    if pruned:
        for n in pruned:
            ax.axvline(n, color="0.85", lw=1, zorder=1)
        ax.plot([], [], color="0.85", label="pruned")
    if baseline is not None:
        ax.axhline(baseline, ls="--", color="tab:green", label="baseline (defaults)")
    if best is not None:
        ax.scatter(
            [best.number],
            [best.value],
            s=160,
            facecolors="none",
            edgecolors="black",
            label="best",
            zorder=4,
        )
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}".strip())
    ax.set_title("optimisation history")
    if not complete and not pruned:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    importances = _importances(feasible)
    if importances:
        names = list(importances)[::-1]
        ax2.barh(names, [importances[n] for n in names], color="tab:blue")
        ax2.set_xlabel("importance (PED-ANOVA, normalised)")
    else:
        ax2.text(
            0.5,
            0.5,
            f"parameter importances need >= 2 feasible complete trials\n(have {len(feasible)})",
            ha="center",
            va="center",
            transform=ax2.transAxes,
        )
        ax2.set_xticks([])
        ax2.set_yticks([])
    ax2.set_title("parameter importances")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _importances(trials: Sequence[Any]) -> dict[str, float]:
    if len(trials) < 2:
        return {}
    import optuna

    try:
        with quiet_optuna():
            study = optuna.create_study(direction="maximize")
            study.add_trials(
                [
                    optuna.trial.create_trial(
                        params=t.params, distributions=t.distributions, value=t.value
                    )
                    for t in trials
                ]
            )
            return dict(optuna.importance.get_param_importances(study))
    except Exception:
        return {}
