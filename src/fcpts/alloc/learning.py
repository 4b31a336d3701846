"""One fcpts optimisation step, and the state a checkpoint keeps between steps.

A step masks the student's learned layers at the current thresholds, computes the
bridged global sparsity and the loss on one calibration batch, and takes one Adam step on
the thetas (and, with joint reconstruction, the kept weights, biases and norms); the
thetas are then clamped to their bounds and lam adapted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import checkpoint as ckpt
from ..errors import UserError
from ..layers import LayerSpec
from ..tasks import Task
from .objective import (
    constraint_loss,
    global_sparsity,
    loss_scale,
    next_lam,
    reconstruction_loss,
    total_loss,
)
from .reconstruction import Student, captured
from .thresholds import Thresholds, layer_mask


@dataclass
class LoopState:
    """What changes from step to step besides tensors: lam, the L_rec unit, the history."""

    lam: float
    rec_scale: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Learner:
    """Everything a step reads: the settings (an FCPTS.Config), the target and N, the
    thresholds, the learned layers and their scores, the student, the batches with the
    teacher's outputs for each, the block modules to capture, and the optimiser."""

    cfg: Any
    target: float
    total: int
    thresholds: Thresholds
    learn: Sequence[LayerSpec]
    scores: Sequence[torch.Tensor]
    student: Student
    task: Task
    batches: Sequence[Any]
    teacher: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]]
    blocks: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: Any = None


def make_optimizer(
    theta: torch.Tensor, student: Student, cfg: Any
) -> tuple[torch.optim.Optimizer, Any]:
    """Adam over the thetas at ``lr`` (when learned) and the student's trained weights at
    ``weight_lr`` (with joint reconstruction), cosine-annealed over ``iters`` by default."""
    groups = [{"params": [theta], "lr": cfg.lr}] if cfg.learn_thresholds else []
    if cfg.joint and cfg.weight_lr > 0:
        params = list(student.weights.values()) + list(student.extra.values())
        groups.append({"params": params, "lr": cfg.weight_lr})
    optimizer = torch.optim.Adam(groups)
    scheduler = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.iters))
        if cfg.schedule == "cosine"
        else None
    )
    return optimizer, scheduler


def step(learner: Learner, state: LoopState, iteration: int) -> dict[str, float]:
    """One optimisation step on batch ``iteration % len(batches)``; updates ``state`` and
    returns the step's record (lam after the step, the losses, S(t) before the step)."""
    cfg, th = learner.cfg, learner.thresholds
    i = iteration % len(learner.batches)
    batch = learner.batches[i]
    t = th.values()
    straight_through = cfg.ste and cfg.learn_thresholds
    masks = [
        layer_mask(m, t[j], th.widths[j], straight_through) for j, m in enumerate(learner.scores)
    ]
    sparsity = global_sparsity(t, th.dists, th.numels, learner.total)
    gap = sparsity - learner.target
    l_c = constraint_loss(gap, cfg.constraint)

    overrides = learner.student.masked(learner.learn, masks)
    with captured(learner.blocks, {}) as blocks:
        raw = learner.task.run(learner.student.model, batch, overrides)
    teacher_target, teacher_blocks = learner.teacher[i]
    l_rec = reconstruction_loss(
        learner.task,
        raw,
        batch,
        teacher_target,
        blocks,
        teacher_blocks,
        cfg.output_weight,
        cfg.block_weight,
    )
    if state.rec_scale is None:
        state.rec_scale = loss_scale(l_rec.item(), cfg.normalize)
    loss = total_loss(l_rec, state.rec_scale, state.lam, l_c)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    if learner.scheduler is not None:
        learner.scheduler.step()
    th.clamp_()
    if cfg.lam_adapt:
        state.lam = next_lam(state.lam, gap.item(), cfg.lam, cfg.tolerance)
    record = {
        "lam": state.lam,
        "loss": loss.item(),
        "rec_loss": l_rec.item(),
        "constraint_loss": l_c.item(),
        "global_sparsity": sparsity.item(),
    }
    state.history.append(record)
    return record


def trained_tensors(learner: Learner) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the thetas and every trained student parameter."""
    return {"theta": learner.thresholds.theta, **learner.student.trained()}


def checkpoint_state(learner: Learner, state: LoopState, device: torch.device) -> dict[str, Any]:
    """The non-tensor state a checkpoint stores beside :func:`trained_tensors`."""
    return {
        "lam": state.lam,
        "rec_scale": state.rec_scale,
        "history": state.history,
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict() if learner.scheduler is not None else None,
        "rng": ckpt.rng_state(device),
    }


def snapshot(learner: Learner, state: LoopState, iterations: int, device) -> ckpt.Snapshot:
    """A checkpoint of the learner after ``iterations`` steps."""
    tensors = {k: v.detach() for k, v in trained_tensors(learner).items()}
    return ckpt.Snapshot(iterations, tensors, checkpoint_state(learner, state, device))


def restore(learner: Learner, saved: ckpt.Snapshot, device: torch.device) -> LoopState:
    """Put a checkpoint's tensors, optimiser, scheduler and RNG state back into the learner."""
    trained = trained_tensors(learner)
    missing = sorted(set(trained) - set(saved.tensors))
    if missing:
        raise UserError(f"the checkpoint lacks {missing[0]}: delete it to start afresh")
    with torch.no_grad():
        for name, tensor in trained.items():
            tensor.copy_(saved.tensors[name])
    state = saved.state
    learner.optimizer.load_state_dict(state["optimizer"])
    if learner.scheduler is not None:
        learner.scheduler.load_state_dict(state["scheduler"])
    ckpt.set_rng_state(state["rng"], device)
    return LoopState(state["lam"], state["rec_scale"], list(state["history"]))
