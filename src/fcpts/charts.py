"""The per-layer sparsity chart (a PNG), drawn with matplotlib on first use."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def chart(
    layers: Sequence[Mapping[str, Any]],
    target: float,
    path: str | os.PathLike,
    title: str | None = None,
) -> Path:
    """A PNG of per-layer sparsity bars (one per prunable layer, in model order) with
    the global target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [layer["name"] or "(root)" for layer in layers]
    values = [layer["sparsity"] for layer in layers]
    height = max(2.8, 0.24 * len(layers) + 1.4)
    fig, ax = plt.subplots(figsize=(8.5, height), dpi=100)
    try:
        colors = ["#3b7dd8" if v < target else "#9bbbe6" for v in values]
        y = list(range(len(layers)))
        ax.barh(y, values, color=colors, height=0.75)
        ax.axvline(
            target, color="#d62728", linestyle="--", linewidth=1.5, label=f"target {target:g}"
        )
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=7 if len(layers) > 20 else 9)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("sparsity (fraction of zero weights)")
        ax.set_title(title or "Per-layer sparsity", fontsize=10)
        from matplotlib.patches import Patch

        handles = [
            ax.get_legend_handles_labels()[0][0],
            Patch(color="#3b7dd8", label="denser than the target"),
            Patch(color="#9bbbe6", label="at or above the target"),
        ]
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout(rect=(0, 0.4 / height, 1, 1))  # room for the legend below
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out
