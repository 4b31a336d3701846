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
(cosine-annealed with the threshold learning rate by default).
The thresholds are initialised from ERK or uniform and finally landed exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import checkpoint as ckpt
from ..bridge import BRIDGES, ScoreDistribution, bridged_sparsity
from ..errors import UserError
from ..settings import Opt, Search
from ..tasks import relative_mse, to_device
from .base import Allocator, Problem, Proposal
from .erk import erk_sparsities


def _positive_median(values: torch.Tensor) -> float:
    pos = values[values > 0]
    if pos.numel() == 0:
        return 1.0
    return float(pos[pos.numel() // 2])


def _threshold_at(values: torch.Tensor, sparsity: float) -> float:
    """A threshold between the c-th and (c+1)-th smallest score, c = round(s * n)."""
    n = values.numel()
    c = min(n, max(0, round(sparsity * n)))
    if c == 0:
        return float(values[0]) * 0.5
    if c == n:
        return float(values[-1]) * 1.0001 + 1e-30
    return 0.5 * (float(values[c - 1]) + float(values[c]))


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
                "learning rate of the joint reconstruction of kept weights, biases and norms",
                search=Search(1e-4, 1e-2),
                metavar="X",
            ),
        ] = 2e-3
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
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        device = problem.device
        task = problem.task
        layers = problem.layers
        learn = [layer for layer in layers if not layer.keep_dense]
        total = problem.total

        init = (
            erk_sparsities(layers, problem.target)
            if cfg.init == "erk"
            else {
                layer.name: min(layer.max_sparsity, max(layer.min_sparsity, problem.target))
                for layer in layers
            }
        )
        dists, refs, theta0, lo_theta, hi_theta, widths = {}, [], [], [], [], []
        for layer in learn:
            scores = problem.scores[layer.name].to(device)
            dist = ScoreDistribution(scores, cfg.kde_samples, cfg.bridge, gen)
            dists[layer.name] = dist
            values = dist.sorted
            ref = _positive_median(values)
            refs.append(ref)
            t0 = max(_threshold_at(values, init[layer.name]), ref * 1e-12)
            theta0.append(math.log(t0 / ref))
            lo = (
                math.log(max(_threshold_at(values, layer.min_sparsity), ref * 1e-12) / ref)
                if layer.min_sparsity > 0
                else -60.0
            )
            hi = (
                math.log(max(_threshold_at(values, layer.max_sparsity), ref * 1e-12) / ref)
                if layer.max_sparsity < 1
                else 60.0
            )
            lo_theta.append(lo)
            hi_theta.append(hi)
            widths.append(cfg.ste_width * dist.bandwidth)

        ref_t = torch.tensor(refs, dtype=torch.float32, device=device)
        theta = torch.tensor(theta0, dtype=torch.float32, device=device, requires_grad=True)
        lo_t = torch.tensor(lo_theta, device=device)
        hi_t = torch.tensor(hi_theta, device=device)

        teacher = problem.model.to(device).eval()
        student = copy.deepcopy(teacher).eval()
        for p in student.parameters():
            p.requires_grad_(False)
        weights = {layer.name: student.get_submodule(layer.name).weight for layer in learn}
        extra: dict[str, nn.Parameter] = {}
        param_groups = [{"params": [theta], "lr": cfg.lr}] if cfg.learn_thresholds else []
        if cfg.joint and cfg.weight_lr > 0:
            learn_names = {layer.param_name for layer in learn}
            dense_names = {layer.param_name for layer in layers if layer.keep_dense}
            for name, p in student.named_parameters():
                if name in dense_names:
                    continue
                if name in learn_names or name.endswith("bias") or p.dim() == 1:
                    p.requires_grad_(True)
                    if name not in learn_names:
                        extra[name] = p
            param_groups.append(
                {
                    "params": [w for w in weights.values()] + list(extra.values()),
                    "lr": cfg.weight_lr,
                }
            )
        optimizer = torch.optim.Adam(param_groups)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.iters))
            if cfg.schedule == "cosine"
            else None
        )

        batches = [to_device(b, device) for b in problem.batches]
        block_cache: dict[str, torch.Tensor] = {}
        block_modules = self._block_modules(student, cfg.blocks)
        teacher_blocks = self._block_modules(teacher, cfg.blocks)
        teacher_out = []
        with torch.no_grad():
            for b in batches:
                handles = self._capture(teacher_blocks, block_cache)
                try:
                    raw = task.run(teacher, b)
                finally:
                    for h in handles:
                        h.remove()
                teacher_out.append((task.target(raw, b).detach(), dict(block_cache)))
                block_cache.clear()

        scores = {layer.name: problem.scores[layer.name].to(device) for layer in learn}
        fixed_zeros = 0.0  # keep-dense layers contribute no zeros
        history: list[dict[str, float]] = []
        rec_scale: float | None = None
        lam = cfg.lam
        trained = {
            "theta": theta,
            **{f"param.{n}": p for n, p in student.named_parameters() if p.requires_grad},
        }
        checkpointer, fingerprint, start = problem.checkpoint, {}, 0
        if checkpointer is not None:
            fingerprint = self._fingerprint(problem)
            snapshot = checkpointer.load(fingerprint)
            if snapshot is not None:
                start = snapshot.iteration
                lam, rec_scale, history = self._restore(
                    snapshot, trained, optimizer, scheduler, device
                )
        bar = tqdm(
            range(start, cfg.iters),
            desc=f"fcpts {problem.target:.0%}",
            disable=not problem.progress,
            leave=False,
            initial=start,
            total=cfg.iters,
        )
        for it in bar:
            i = it % len(batches)
            batch = batches[i]
            t = torch.exp(theta) * ref_t
            overrides = {}
            sparsity_terms = []
            for j, layer in enumerate(learn):
                m = scores[layer.name]
                hard = (m > t[j]).to(m.dtype)
                if cfg.ste and cfg.learn_thresholds:
                    soft = torch.sigmoid((m - t[j]) / widths[j])
                    mask = hard + soft - soft.detach()
                else:
                    mask = hard
                overrides[layer.param_name] = weights[layer.name] * mask
                sparsity_terms.append(bridged_sparsity(t[j], dists[layer.name]) * layer.numel)
            global_s = (torch.stack(sparsity_terms).sum() + fixed_zeros) / total
            gap = global_s - problem.target
            l_c = gap.abs() if cfg.constraint == "l1" else gap.pow(2)

            handles = self._capture(block_modules, block_cache)
            try:
                raw = task.run(student, batch, overrides)
            finally:
                for h in handles:
                    h.remove()
            t_out, t_blocks = teacher_out[i]
            l_rec = cfg.output_weight * task.loss(task.target(raw, batch), t_out, batch)
            if block_cache:
                l_blocks = sum(
                    relative_mse(block_cache[k], t_blocks[k]) for k in block_cache
                ) / len(block_cache)
                l_rec = l_rec + cfg.block_weight * l_blocks
            block_cache.clear()
            if rec_scale is None:
                # the first reconstruction loss sets the unit, so lam means the same on any model
                rec_scale = l_rec.item() if cfg.normalize and l_rec.item() > 0 else 1.0
            loss = l_rec / rec_scale + lam * l_c
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            with torch.no_grad():
                theta.copy_(torch.maximum(torch.minimum(theta, hi_t), lo_t))
            if cfg.lam_adapt:
                # dual-ascent-like: lam grows while the sparsity is off target, relaxes back after
                lam = lam * 1.05 if abs(gap.item()) > cfg.tolerance else max(cfg.lam, lam / 1.05)
            record = {
                "lam": lam,
                "loss": loss.item(),
                "rec_loss": l_rec.item(),
                "constraint_loss": l_c.item(),
                "global_sparsity": global_s.item(),
            }
            history.append(record)
            bar.set_postfix(
                loss=f"{record['loss']:.4f}", sparsity=f"{record['global_sparsity']:.4f}"
            )
            if problem.callback is not None:
                problem.callback(it, record)
            if checkpointer is not None and checkpointer.due(it + 1, cfg.iters):
                state = {
                    "lam": lam,
                    "rec_scale": rec_scale,
                    "history": history,
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "rng": ckpt.rng_state(device),
                }
                tensors = {k: v.detach() for k, v in trained.items()}
                checkpointer.save(fingerprint, ckpt.Snapshot(it + 1, tensors, state))

        with torch.no_grad():
            t_final = (torch.exp(theta) * ref_t).tolist()
        thresholds = {layer.name: t_final[j] for j, layer in enumerate(learn)}
        for layer in layers:
            if layer.keep_dense:
                thresholds[layer.name] = 0.0
        proposal = Proposal(thresholds=thresholds, history=history)
        if cfg.joint and cfg.weight_lr > 0:
            proposal.weights = {n: w.detach().clone() for n, w in weights.items()}
            proposal.params = {n: p.detach().clone() for n, p in extra.items()}
        return proposal

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

    @staticmethod
    def _restore(
        snapshot, trained, optimizer, scheduler, device
    ) -> tuple[float, float | None, list]:
        """Put a checkpoint's state back; return lam, the loss scale and the history."""
        missing = sorted(set(trained) - set(snapshot.tensors))
        if missing:
            raise UserError(f"the checkpoint lacks {missing[0]}: delete it to start afresh")
        with torch.no_grad():
            for name, tensor in trained.items():
                tensor.copy_(snapshot.tensors[name])
        state = snapshot.state
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"], device)
        return state["lam"], state["rec_scale"], list(state["history"])

    @staticmethod
    def _block_modules(model: nn.Module, patterns: tuple[str, ...]) -> dict[str, nn.Module]:
        from ..layers import matches

        if not patterns:
            return {}
        found = {
            n: m for n, m in model.named_modules() if n and any(matches(n, p) for p in patterns)
        }
        if not found:
            raise UserError(f"fcpts setting blocks {list(patterns)} matches no module of the model")
        return found

    @staticmethod
    def _capture(modules: dict[str, nn.Module], cache: dict[str, torch.Tensor]) -> list:
        handles = []
        for name, module in modules.items():

            def hook(_m, _a, out, name=name):
                cache[name] = out[0] if isinstance(out, (tuple, list)) else out

            handles.append(module.register_forward_hook(hook))
        return handles
