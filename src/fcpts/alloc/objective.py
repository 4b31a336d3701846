"""The fcpts objective: L = L_rec / scale + lam * L_c(S(t), S*).

S(t) is the parameter-weighted mean of the layers' sparsities, each exact in the forward
pass and differentiable through the bridge (:mod:`fcpts.bridge`). L_c is |S - S*| or
(S - S*)^2. L_rec compares the student's output (and optionally block outputs) with the
frozen dense teacher's; ``scale`` is its first value, so lam means the same on any model.
While |S - S*| exceeds the tolerance lam grows by 5% an iteration, and it relaxes back
towards its set value after.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..bridge import ScoreDistribution, bridged_sparsity
from ..tasks import Task, relative_mse

LAM_GROWTH = 1.05


def global_sparsity(
    t: torch.Tensor, dists: Sequence[ScoreDistribution], numels: Sequence[int], total: int
) -> torch.Tensor:
    """S(t) = sum_l n_l F_l(t_l) / N over the learned layers (keep-dense layers, also in
    N, contribute no zeros)."""
    terms = [
        bridged_sparsity(t[j], dist) * n
        for j, (dist, n) in enumerate(zip(dists, numels, strict=True))
    ]
    return torch.stack(terms).sum() / total


def constraint_loss(gap: torch.Tensor, kind: str) -> torch.Tensor:
    """L_c of the gap S - S*: |gap| for ``l1``, gap^2 for ``l2``."""
    return gap.abs() if kind == "l1" else gap.pow(2)


def reconstruction_loss(
    task: Task,
    raw: Any,
    batch: Any,
    teacher_target: torch.Tensor,
    blocks: Mapping[str, torch.Tensor],
    teacher_blocks: Mapping[str, torch.Tensor],
    output_weight: float,
    block_weight: float,
) -> torch.Tensor:
    """L_rec: the task's loss of the student's output against the teacher's, plus
    ``block_weight`` times the mean relative MSE of the captured block outputs."""
    loss = output_weight * task.loss(task.target(raw, batch), teacher_target, batch)
    if blocks:
        per_block = sum(relative_mse(blocks[k], teacher_blocks[k]) for k in blocks)
        loss = loss + block_weight * (per_block / len(blocks))
    return loss


def loss_scale(first_rec_loss: float, normalize: bool) -> float:
    """The unit of L_rec: its first value when normalising (and it is positive), else 1."""
    return first_rec_loss if normalize and first_rec_loss > 0 else 1.0


def total_loss(
    rec_loss: torch.Tensor, scale: float, lam: float, constraint: torch.Tensor
) -> torch.Tensor:
    return rec_loss / scale + lam * constraint


def next_lam(lam: float, gap: float, base: float, tolerance: float) -> float:
    """Dual-ascent-like: lam grows while |gap| > tolerance, then relaxes back to ``base``."""
    return lam * LAM_GROWTH if abs(gap) > tolerance else max(base, lam / LAM_GROWTH)
