"""FCPTS: learned per-layer thresholds under a global sparsity constraint.

Each prunable layer l has a learnable log-threshold theta_l; its threshold on the scores
is t_l = exp(theta_l) * ref_l (ref_l: the median positive score, so thetas are comparable
across layers). The global sparsity S(t) = sum_l n_l F_l(t_l) / N is differentiable
through the KDE bridge, and the loss is

    L = L_rec(sparse, dense) + lam * |S(t) - S*|      (or squared)

L_rec is divided by its first value (``normalize``), so lam means the same on any model;
with ``lam_adapt`` lam grows by 5% per iteration while |S - S*| exceeds ``tolerance`` and
relaxes back to its set value after. L_rec compares the masked network with the frozen dense one on the calibration batches
(the task's output and, optionally, block outputs). With ``ste=True`` the hard mask
1[m > t] passes gradients to t through a sigmoid surrogate of width ``ste_width`` KDE
bandwidths; with ``ste=False`` only L_c moves the thresholds (the official code).
``joint=True`` also reconstructs the kept weights, biases and norms at ``weight_lr``
times each parameter's RMS (cosine-annealed with the threshold learning rate by default).
A fraction ``holdout`` of the calibration batches stays out of learning: the best
iterate on it is kept, learning stops once it no longer improves, and when nothing beat
the starting allocation the result is that start (see :mod:`fcpts.alloc.phases`, which
also runs the optional OBS start). The thresholds are initialised from ERK or uniform
and finally landed exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..bridge import BRIDGES
from ..errors import UserError
from ..settings import Opt, Search
from ..tasks import to_device
from . import phases
from .base import Allocator, Problem, Proposal
from .learning import Learner, LoopState, make_optimizer, restore, set_lr, snapshot, step
from .reconstruction import block_modules, make_student, teacher_outputs
from .thresholds import init_thresholds, initial_sparsities


class FCPTS(Allocator):
    name = "fcpts"

    @dataclass(frozen=True)
    class Config:
        iters: Annotated[
            int,
            Opt(
                "optimisation iterations, one calibration batch each",
                search=Search(50, 400),
                metavar="N",
            ),
        ] = 200
        lam: Annotated[
            float,
            Opt(
                "weight of the sparsity constraint |S(t) - S*| against the normalised "
                "reconstruction loss",
                search=Search(0.1, 10.0),
                metavar="X",
            ),
        ] = 1.0
        lam_adapt: Annotated[
            bool, Opt("grow lam by 5% per iteration while |S - S*| exceeds the tolerance")
        ] = True
        tolerance: Annotated[
            float, Opt("allowed |S - S*| before lam grows", flag="lam-tolerance", metavar="X")
        ] = 0.002
        constraint: Annotated[
            Literal["l1", "l2"], Opt("form of the sparsity constraint: |S - S*| or (S - S*)^2")
        ] = "l1"
        lr: Annotated[
            float,
            Opt("learning rate of the log-thresholds", search=Search(0.005, 0.2), metavar="X"),
        ] = 0.05
        weight_lr: Annotated[
            float,
            Opt(
                "learning rate of the joint reconstruction of kept weights, biases and norms "
                "(a fraction of each parameter's RMS with --weight-step relative)",
                search=Search(0.003, 0.1),
                metavar="X",
            ),
        ] = 0.02
        weight_warmup: Annotated[
            int,
            Opt(
                "iterations over which the weight learning rate ramps up linearly from "
                "1/N of weight_lr (at most a tenth of the phase; 0: none); keeps the "
                "first Adam steps from upsetting BatchNorm and depthwise layers",
                metavar="N",
            ),
        ] = 10
        weight_step: Annotated[
            Literal["relative", "absolute"],
            Opt(
                "weight_lr relative to each parameter's RMS (safe on any model), or the same "
                "absolute step for every parameter"
            ),
        ] = "relative"
        holdout: Annotated[
            float,
            Opt(
                "fraction of the calibration batches held out of learning to pick the best "
                "iterate and stop early (0: evaluate on the training batches)",
                metavar="X",
            ),
        ] = 0.125
        eval_every: Annotated[int, Opt("iterations between held-out evaluations", metavar="N")] = 10
        patience: Annotated[
            int,
            Opt(
                "held-out evaluations without improvement before a phase stops (0: never)",
                metavar="N",
            ),
        ] = 4
        obs_start: Annotated[
            bool,
            Opt(
                "after the thresholds are learned, prune to their allocation by OBS "
                "(SparseGPT) and reconstruct the weights from there under fixed masks"
            ),
        ] = False
        obs_at: Annotated[
            float,
            Opt(
                "fraction of the iterations that learn the thresholds before the OBS start",
                metavar="X",
            ),
        ] = 0.5
        obs_blocks: Annotated[
            tuple[str, ...],
            Opt(
                "module-name patterns whose layers share one OBS calibration pass (empty: "
                "one pass per layer)",
                metavar="PATTERN",
            ),
        ] = ()
        joint: Annotated[
            bool,
            Opt(
                "reconstruct the kept weights, biases and norms jointly (--no-joint keeps the "
                "kept weights bit-for-bit those of the dense model)"
            ),
        ] = True
        learn_thresholds: Annotated[
            bool, Opt("learn the per-layer thresholds (off: the initial allocation stays)")
        ] = True
        ste: Annotated[
            bool,
            Opt(
                "let the reconstruction loss move the thresholds through a straight-through "
                "estimator (off: only the constraint moves them, as the official code)"
            ),
        ] = True
        ste_width: Annotated[
            float,
            Opt(
                "width of the straight-through sigmoid, in KDE bandwidths",
                search=Search(0.25, 4.0),
                metavar="X",
            ),
        ] = 1.0
        init: Annotated[Literal["erk", "uniform"], Opt("initial allocation of the thresholds")] = (
            "erk"
        )
        bridge: Annotated[
            Literal["kde", "hist"],
            Opt("density estimate of the bridge: Gaussian KDE, or a 100-bin histogram"),
        ] = "kde"
        kde_samples: Annotated[
            int, Opt("scores per layer the KDE is estimated on", metavar="N")
        ] = 4096
        blocks: Annotated[
            tuple[str, ...],
            Opt(
                "module-name patterns whose outputs are also reconstructed (block MSE)",
                metavar="PATTERN",
            ),
        ] = ()
        block_weight: Annotated[
            float, Opt("weight of the block-output reconstruction loss", metavar="X")
        ] = 1.0
        output_weight: Annotated[
            float, Opt("weight of the final-output reconstruction loss", metavar="X")
        ] = 1.0
        normalize: Annotated[bool, Opt("divide the reconstruction loss by its first value")] = True
        schedule: Annotated[
            Literal["constant", "cosine"], Opt("learning-rate schedule of both learning rates")
        ] = "cosine"
        seed: Annotated[int, Opt("seed of the learned method", cli=False, kfp=False)] = 0

        def __post_init__(self) -> None:
            def need(ok: bool, msg: str) -> None:
                if not ok:
                    raise UserError(f"fcpts setting {msg}")

            need(
                int(self.iters) == self.iters and self.iters >= 0,
                f"iters must be an integer >= 0, got {self.iters}",
            )
            need(
                self.lam >= 0,
                f"lam must be >= 0 (weight of the sparsity constraint), got {self.lam}",
            )
            need(
                self.tolerance > 0,
                f"tolerance must be > 0 (allowed |S - S*| before lam grows), got {self.tolerance}",
            )
            need(
                self.constraint in ("l1", "l2"),
                f"constraint must be 'l1' or 'l2', got {self.constraint!r}",
            )
            need(self.lr > 0, f"lr must be > 0 (threshold learning rate, e.g. 0.05), got {self.lr}")
            need(self.weight_lr >= 0, f"weight_lr must be >= 0, got {self.weight_lr}")
            need(
                int(self.weight_warmup) == self.weight_warmup and self.weight_warmup >= 0,
                f"weight_warmup must be an integer >= 0 (iterations), got {self.weight_warmup}",
            )
            need(
                self.weight_step in ("relative", "absolute"),
                f"weight_step must be 'relative' or 'absolute', got {self.weight_step!r}",
            )
            need(0 <= self.holdout < 1, f"holdout must be in [0, 1), got {self.holdout}")
            need(
                int(self.eval_every) == self.eval_every and self.eval_every >= 1,
                f"eval_every must be an integer >= 1, got {self.eval_every}",
            )
            need(
                int(self.patience) == self.patience and self.patience >= 0,
                f"patience must be an integer >= 0, got {self.patience}",
            )
            need(0 < self.obs_at <= 1, f"obs_at must be in (0, 1], got {self.obs_at}")
            need(
                self.ste_width > 0,
                f"ste_width must be > 0 (in KDE bandwidths), got {self.ste_width}",
            )
            need(
                self.schedule in ("constant", "cosine"),
                f"schedule must be 'constant' or 'cosine', got {self.schedule!r}",
            )
            need(
                self.init in ("erk", "uniform"),
                f"init must be 'erk' or 'uniform', got {self.init!r}",
            )
            need(self.bridge in BRIDGES, f"bridge must be one of {BRIDGES}, got {self.bridge!r}")
            need(self.kde_samples >= 16, f"kde_samples must be >= 16, got {self.kde_samples}")
            need(
                self.output_weight >= 0 and self.block_weight >= 0,
                "output_weight and block_weight must be >= 0",
            )
            need(
                self.learn_thresholds or (self.joint and self.weight_lr > 0),
                "learn_thresholds=False with joint=False leaves nothing to learn: use method erk or uniform",
            )
            object.__setattr__(self, "blocks", tuple(self.blocks))
            blocks = (self.obs_blocks,) if isinstance(self.obs_blocks, str) else self.obs_blocks
            object.__setattr__(self, "obs_blocks", tuple(blocks))

    def propose(self, problem: Problem) -> Proposal:
        cfg = self.config
        if problem.model is None or problem.task is None:
            raise UserError(
                "the fcpts method learns from calibration data: give it a model and a task"
            )
        if not problem.batches:
            raise UserError(
                "the calibration set is empty: fcpts needs at least one calibration batch"
            )
        learner = self._learner(problem)
        state = LoopState(lam=cfg.lam)
        checkpointer, fingerprint, start = problem.checkpoint, {}, 0
        if checkpointer is not None:
            fingerprint = self._fingerprint(problem)
            saved = checkpointer.load(fingerprint, total=cfg.iters)
            if saved is not None:
                start = saved.iteration
                state = restore(learner, saved, problem.device)
        if start == 0:
            phases.begin(learner, state)
        bar = tqdm(
            range(start, cfg.iters),
            desc=f"fcpts {problem.target:.0%}",
            disable=not problem.progress,
            leave=False,
            initial=start,
            total=cfg.iters,
        )
        for it in bar:
            extra = phases.next_phase(problem, learner, state, it)
            if state.stopped or it - state.phase_start >= phases.phase_length(cfg, state.phase):
                break
            length = phases.phase_length(cfg, state.phase)
            set_lr(learner, state, it, length)
            record = step(learner, state, it)
            record.update(extra)
            done = it + 1 - state.phase_start
            if done % cfg.eval_every == 0 or done == length:
                record.update(phases.evaluate(learner, state))
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", sparsity=f"{record['global_sparsity']:.4f}"
            )
            if problem.callback is not None:
                problem.callback(it, record)
            if checkpointer is not None and checkpointer.due(it + 1, cfg.iters):
                checkpointer.save(fingerprint, snapshot(learner, state, it + 1, problem.device))
        bar.close()
        proposal = phases.proposal(problem, learner, state)
        if checkpointer is not None and start < cfg.iters and len(state.history) < cfg.iters:
            # stopped early: the final state is the finished run (a resume runs nothing)
            checkpointer.save(fingerprint, snapshot(learner, state, cfg.iters, problem.device))
        return proposal

    def _learner(self, problem: Problem) -> Learner:
        """Thresholds at their initial allocation, the teacher's outputs, the student and
        the optimiser: everything the optimisation steps share."""
        cfg = self.config
        torch.manual_seed(cfg.seed)
        device = problem.device
        learn = [layer for layer in problem.layers if not layer.keep_dense]
        thresholds = init_thresholds(
            learn,
            problem.scores,
            initial_sparsities(problem.layers, problem.target, cfg.init),
            kde_samples=cfg.kde_samples,
            bridge=cfg.bridge,
            ste_width=cfg.ste_width,
            generator=torch.Generator().manual_seed(cfg.seed),
            device=device,
        )
        teacher = problem.model.to(device).eval()
        student = make_student(
            teacher, problem.layers, cfg.joint and cfg.weight_lr > 0, problem.view
        )
        optimizer, scheduler = make_optimizer(thresholds.theta, student, cfg)
        train, held = phases.split_batches(
            [to_device(b, device) for b in problem.batches], cfg.holdout
        )
        modules = block_modules(teacher, cfg.blocks)
        learner = Learner(
            cfg=cfg,
            target=problem.target,
            total=problem.total,
            thresholds=thresholds,
            learn=learn,
            scores=[problem.scores[layer.name].to(device) for layer in learn],
            student=student,
            task=problem.task,
            batches=train,
            teacher=teacher_outputs(teacher, problem.task, train, modules),
            blocks=block_modules(student.model, cfg.blocks),
            optimizer=optimizer,
            scheduler=scheduler,
            held=held,
            held_teacher=teacher_outputs(teacher, problem.task, held, modules),
            start_theta=thresholds.theta.detach().clone(),
        )
        return learner

    def _fingerprint(self, problem: Problem) -> dict[str, str]:
        """What a resumed run must share with the run that wrote the checkpoint."""
        return ckpt.fingerprint(
            {
                "settings": dataclasses.asdict(self.config),
                "target": problem.target,
                "score": problem.score_kind,
                "layers": [dataclasses.asdict(layer) for layer in problem.layers],
                "scores": problem.scores,
                "model": problem.model,
                "batches": list(problem.batches),
                "task": f"{type(problem.task).__module__}.{type(problem.task).__qualname__}",
                "device": problem.device.type,
            }
        )
