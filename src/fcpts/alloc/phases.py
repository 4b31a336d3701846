"""Held-out checks of fcpts's learning: the best iterate, early stopping, the OBS start.

Part of the calibration batches is held out of the optimisation (``holdout``). Every
``eval_every`` iterations the reconstruction loss on them is measured with hard masks;
the best iterate is kept (thresholds compared at the target: shifted onto it by one
shared offset), and a phase stops after
``patience`` evaluations without improvement. The allocation's own starting point (its
initial thresholds with the dense weights) is the first candidate, so the result is
never worse on the held-out batches than where learning began; when no iterate beat it
the proposal falls back to it and says so (``fell_back`` in the last history record).

With ``obs_start`` learning runs in two phases. Phase 1 learns the thresholds (and,
with joint reconstruction, the weights) for ``obs_at`` of the iterations; its best
thresholds are landed on exact per-layer counts, and those layers are pruned by OBS
(SparseGPT: :func:`fcpts.alloc.sparsegpt.prune_in_order`) from the dense weights.
Phase 2 then reconstructs the weights, biases and norms under those fixed masks for the
remaining iterations, starting from the OBS weights.
"""

from __future__ import annotations

import torch

from .base import Problem, Proposal
from .learning import Learner, LoopState, held_loss, projected_theta, trained_tensors
from .sparsegpt import landed_counts, prune_in_order

IMPROVEMENT = 1e-4  # a held-out loss counts as better when it is this fraction lower


def split_batches(batches: list, holdout: float) -> tuple[list, list]:
    """(train, held): the last round(holdout x n) batches are held out (at least one when
    there are two or more); with none to spare the held-out set is the training set."""
    n = len(batches)
    k = min(n - 1, max(1, round(holdout * n))) if holdout > 0 and n >= 2 else 0
    if k == 0:
        return list(batches), list(batches)
    return list(batches[: n - k]), list(batches[n - k :])


def keep_best(learner: Learner, theta: torch.Tensor | None = None) -> None:
    """Remember the current iterate (with the thetas ``theta`` when given) as the best."""
    learner.best = {k: v.detach().clone() for k, v in trained_tensors(learner).items()}
    if theta is not None:
        learner.best["theta"] = theta.detach().clone()


def load_best(learner: Learner) -> None:
    """Put the best iterate back into the learner's tensors."""
    if not learner.best:
        return
    with torch.no_grad():
        for name, tensor in trained_tensors(learner).items():
            tensor.copy_(learner.best[name])


def evaluate(learner: Learner, state: LoopState) -> dict[str, float]:
    """Measure the held-out loss at the target (the thresholds shifted onto it), keep the
    iterate when it is the best so far, and stop the phase after ``patience``
    evaluations without improvement."""
    cfg = learner.cfg
    theta = projected_theta(learner) if learner.fixed is None else None
    loss = held_loss(learner, theta)
    if state.best_loss is None or loss < state.best_loss * (1 - IMPROVEMENT):
        state.best_loss = loss
        state.stale = 0
        keep_best(learner, theta)
    else:
        state.stale += 1
    if cfg.patience and state.stale >= cfg.patience:
        state.stopped = True
    return {"held_loss": loss, "best_held_loss": float(state.best_loss)}


def begin(learner: Learner, state: LoopState) -> None:
    """Before the first step: the starting point's held-out loss, the first best iterate."""
    state.start_loss = held_loss(learner)
    state.best_loss = state.start_loss
    state.stale = 0
    keep_best(learner)


def obs_active(cfg) -> bool:
    """An OBS start needs weights to reconstruct: joint reconstruction at a positive rate."""
    return bool(cfg.obs_start and cfg.joint and cfg.weight_lr > 0)


def phase_length(cfg, phase: int) -> int:
    """Iterations of a phase: ``obs_at`` of them for phase 1 with an OBS start (none
    are left for phase 2 at obs_at=1: no OBS start)."""
    if not obs_active(cfg):
        return cfg.iters
    first = max(1, min(cfg.iters, round(cfg.obs_at * cfg.iters)))
    return first if phase == 1 else cfg.iters - first


def obs_transition(
    problem: Problem, learner: Learner, state: LoopState, iteration: int, counts_of, prune
) -> dict[str, float]:
    """End phase 1: its best thresholds give exact per-layer counts (``counts_of``), the
    dense weights are pruned to them by OBS (``prune``), the student restarts from the
    dense model with those weights and fixed masks, and phase 2 begins at ``iteration``."""
    load_best(learner)
    thresholds = learner.thresholds.final()
    for layer in problem.layers:
        if layer.keep_dense:
            thresholds[layer.name] = 0.0
    counts = counts_of(problem, Proposal(thresholds=thresholds))
    train = learner.batches
    masks, weights = prune(problem, counts, train)
    student = learner.student
    dense = dict(problem.model.named_parameters())
    with torch.no_grad():
        for name, p in student.model.named_parameters():
            if p.requires_grad:
                p.copy_(dense[name].to(p.device, p.dtype))
        for layer in learner.learn:
            if layer.name in weights:
                student.weights[layer.name].copy_(
                    weights[layer.name].to(student.weights[layer.name])
                )
    dtype = learner.scores[0].dtype
    learner.fixed = [
        masks[layer.name].to(learner.scores[0].device, dtype) for layer in learner.learn
    ]
    learner.optimizer.state.clear()
    learner.phase1 = learner.best
    state.phase1_loss = state.best_loss
    state.phase, state.phase_start, state.stopped = 2, iteration, False
    state.best_loss = held_loss(learner)
    state.stale = 0
    keep_best(learner)
    return {"phase1_held_loss": float(state.phase1_loss or 0.0), "obs_held_loss": state.best_loss}


def fell_back(state: LoopState) -> bool:
    """Whether no iterate beat the allocation's starting point on the held-out batches."""
    return (
        state.start_loss is not None
        and state.best_loss is not None
        and state.best_loss >= state.start_loss
    )


def next_phase(problem: Problem, learner: Learner, state: LoopState, it: int) -> dict[str, float]:
    """Start phase 2 (the OBS start) when phase 1 is over; its figures for the record."""
    cfg = learner.cfg
    over = state.stopped or it - state.phase_start >= phase_length(cfg, 1)
    if state.phase != 1 or not obs_active(cfg) or not over:
        return {}
    options = {"damp": 0.01, "blocksize": 128, "nm": None}

    def prune(problem, counts, batches):
        return prune_in_order(problem, counts, options, cfg.obs_blocks, batches)

    return obs_transition(problem, learner, state, it, landed_counts, prune)


def proposal(problem: Problem, learner: Learner, state: LoopState) -> Proposal:
    """The best iterate: its thresholds (keep-dense layers: 0), or after an OBS start
    its fixed masks, and with joint reconstruction the reconstructed weights and
    parameters. When no iterate beat the starting point on the held-out batches, the
    starting point itself (initial thresholds, dense weights), marked ``fell_back``."""
    cfg = learner.cfg
    obs_kept = state.phase == 2
    if obs_kept and state.phase1_loss is not None and state.phase1_loss < state.best_loss:
        # phase 1's best iterate beat every one after the OBS start: it is the result
        learner.best, learner.fixed = learner.phase1, None
        state.best_loss, obs_kept = state.phase1_loss, False
    back = fell_back(state)
    if state.history:
        state.history[-1] = dict(
            state.history[-1],
            fell_back=float(back),
            obs_start_kept=float(obs_kept and not back),
            start_held_loss=float(state.start_loss or 0.0),
            final_held_loss=float(state.start_loss if back else state.best_loss or 0.0),
        )
    if back:
        with torch.no_grad():
            learner.thresholds.theta.copy_(learner.start_theta)
        learner.fixed = None
    else:
        load_best(learner)
    thresholds = learner.thresholds.final()
    for layer in problem.layers:
        if layer.keep_dense:
            thresholds[layer.name] = 0.0
    proposal = Proposal(thresholds=thresholds, history=state.history)
    if learner.fixed is not None:
        masks = {layer.name: torch.ones(layer.shape, dtype=torch.bool) for layer in problem.layers}
        for layer, m in zip(learner.learn, learner.fixed, strict=True):
            masks[layer.name] = m.detach().bool().cpu()
        proposal.thresholds = None
        proposal.masks = masks
        proposal.sparsities = {
            layer.name: int((~masks[layer.name]).sum()) / layer.numel for layer in problem.layers
        }
    if cfg.joint and cfg.weight_lr > 0 and not back:
        student = learner.student
        proposal.weights = {n: w.detach().clone() for n, w in student.weights.items()}
        if proposal.masks is not None:
            for n in proposal.weights:
                proposal.weights[n] *= proposal.masks[n].to(proposal.weights[n])
        proposal.params = {n: p.detach().clone() for n, p in student.extra.items()}
    elif proposal.masks is not None and not back:
        proposal.weights = {
            n: w.detach().clone() * proposal.masks[n].to(w)
            for n, w in learner.student.weights.items()
        }
    return proposal
