"""One block of the block-wise allocation: statistics, learned thresholds, exact counts,
and the pruned weights.

The block's learned layers get FCPTS log-thresholds (:mod:`fcpts.alloc.thresholds`),
initialised at the block's goal and moved by Adam on

    L_b = rec_b / (B * rec_b(first step)) + lam * |S_est(t) - S*|,
    S_est(t) = (Z_done + sum_{l in b} n_l F_l(t_l) + N_rest * S*) / N,

where B is the number of blocks (the whole-model loss averages the blocks' terms),
rec_b the relative MSE of the masked block's output against the dense block's
on the same inputs (straight-through masks), Z_done the zeros already placed in earlier
blocks and N_rest the weights of the blocks still to come (counted at S*). The
constraint is the whole model's: a block's deviation costs lam * n_b / N, as a layer's
does in the whole-model path, and the debt of earlier blocks is carried.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import obs
from ..alloc.objective import constraint_loss, global_sparsity, next_lam, total_loss
from ..alloc.thresholds import init_thresholds
from ..layers import LayerSpec
from ..tasks import relative_mse
from .decoder import run_block


@dataclass(frozen=True)
class BlockwiseConfig:
    """Settings of the block-wise allocation (see :mod:`fcpts.blockwise`)."""

    iters: int = 20  # threshold-learning steps per block, one calibration batch each
    lr: float = 0.05  # Adam learning rate of the log-thresholds
    lam: float = 1.0  # weight of the global constraint |S_est - S*|
    tolerance: float = 0.002  # |S_est - S*| beyond which lam grows 5% per step
    ste_width: float = 1.0  # straight-through sigmoid width, in KDE bandwidths
    kde_samples: int = 4096  # scores per layer the bridge's KDE is estimated on
    reconstruct: str = "obs"  # obs: SparseGPT's update of the kept weights; none: masks only
    damp: float = 0.01  # OBS Hessian dampening
    blocksize: int = 128  # OBS lazy-update columns
    memory_mb: int = 256  # calibration activations kept in memory; beyond: spilled to disk
    seed: int = 0


class _MaskedWeight(torch.autograd.Function):
    """w * 1[m > t] forward; backward to t that of w * sigmoid((m - t) / width), the
    straight-through estimator of :func:`fcpts.alloc.thresholds.layer_mask`, recomputed
    in the backward pass so that no weight-sized tensor is kept besides the output."""

    @staticmethod
    def forward(ctx, t, weight, scores, width):
        ctx.save_for_backward(t, weight, scores)
        ctx.width = width
        return weight * (scores > t).to(weight.dtype)

    @staticmethod
    def backward(ctx, grad):
        t, weight, scores = ctx.saved_tensors
        sig = torch.sigmoid((scores - t) / ctx.width)
        dsig = sig.mul_(1 - sig).div_(ctx.width)  # d sigmoid / d m; d / d t is its negative
        return -(grad * weight * dsig).sum(), None, None, None


def masked_weight(t: torch.Tensor, weight: torch.Tensor, scores: torch.Tensor, width: float):
    """The weight masked at threshold ``t`` with a straight-through gradient to ``t``."""
    return _MaskedWeight.apply(t, weight, scores, width)


@dataclass
class BlockStats:
    """X^T X of the learned layers' inputs (their Hessians up to 2/n) and the sample
    counts, one per distinct input: layers fed the same tensor (q/k/v, gate/up) share the
    entry of the first of them, which ``source`` names for every layer."""

    xtx: dict[str, torch.Tensor] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    source: dict[str, str] = field(default_factory=dict)

    def norms(self) -> dict[str, torch.Tensor]:
        """Wanda's ||x_j||_2 per input column: the square root of diag(X^T X)."""
        own = {k: torch.diagonal(x[0]).clamp_min(0).sqrt() for k, x in self.xtx.items()}
        return {name: own[key] for name, key in self.source.items()}


@torch.no_grad()
def dense_pass(
    block: nn.Module, layers: Sequence[LayerSpec], inputs, extras, targets
) -> BlockStats:
    """Run the dense block over every input batch: its outputs go to ``targets`` and the
    layers' input statistics are accumulated (once per distinct input tensor)."""
    stats = BlockStats()
    seen: list[tuple[torch.Tensor, str]] = []  # this batch's inputs and their entries
    handles = []
    for layer in layers:
        module = block.get_submodule(layer.name)

        def hook(mod, args, _out, layer=layer):
            key = next((k for x, k in seen if x is args[0]), None)
            if stats.source.setdefault(layer.name, key or layer.name) != (key or layer.name):
                raise RuntimeError(f"the inputs of {layer.name} changed between batches")
            if key is not None:
                return
            seen.append((args[0], layer.name))
            acc, n = obs.accumulate(
                stats.xtx.get(layer.name), obs.layer_inputs(layer, mod, args[0])
            )
            stats.xtx[layer.name] = acc
            stats.samples[layer.name] = stats.samples.get(layer.name, 0) + n

        handles.append(module.register_forward_hook(hook))
    try:
        for i in range(len(inputs)):
            args, kwargs = extras[i]
            targets.append(run_block(block, inputs[i], args, kwargs))
            seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def learn_thresholds(
    block: nn.Module,
    layers: Sequence[LayerSpec],
    scores: dict[str, torch.Tensor],
    data: tuple[Any, Sequence, Any],
    budget: dict[str, float],
    cfg: BlockwiseConfig,
    seed: int,
) -> tuple[dict[str, float], list[dict[str, float]]]:
    """The learned thresholds t_l of the block's layers and the steps' history.

    ``data`` is (inputs, extras, targets); ``budget`` holds the global target, N, the
    zeros placed so far, the weights still to come and the block's goal sparsity.
    """
    inputs, extras, targets = data
    torch.manual_seed(seed)
    th = init_thresholds(
        layers,
        scores,
        {layer.name: budget["goal"] for layer in layers},
        kde_samples=cfg.kde_samples,
        bridge="kde",
        ste_width=cfg.ste_width,
        generator=torch.Generator().manual_seed(seed),
        device=torch.device("cpu"),
    )
    if cfg.iters == 0:
        return th.final(), []
    weights = {layer.name: block.get_submodule(layer.name).weight.detach() for layer in layers}
    flat = [scores[layer.name] for layer in layers]
    optimizer = torch.optim.Adam([th.theta], lr=cfg.lr)
    lam, scale, history = cfg.lam, None, []
    target, total = budget["target"], budget["total"]
    fixed = (budget["zeros_done"] + budget["rest"] * target) / total
    for it in range(cfg.iters):
        i = it % len(inputs)
        t = th.values()
        overrides = {
            f"{layer.name}.weight": masked_weight(t[j], weights[layer.name], flat[j], th.widths[j])
            for j, layer in enumerate(layers)
        }
        args, kwargs = extras[i]
        out = run_block(block, inputs[i], args, kwargs, overrides)
        rec = relative_mse(out, targets[i])
        estimate = fixed + global_sparsity(t, th.dists, th.numels, total)
        gap = estimate - target
        l_c = constraint_loss(gap, "l1")
        if scale is None:
            scale = rec.item() if rec.item() > 0 else 1.0
        loss = total_loss(rec, scale * budget["blocks"], lam, l_c)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        th.clamp_()
        lam = next_lam(lam, gap.item(), cfg.lam, cfg.tolerance)
        history.append({"rec_loss": rec.item(), "estimate": estimate.item(), "lam": lam})
    return th.final(), history


def block_counts(
    layers: Sequence[LayerSpec],
    scores: dict[str, torch.Tensor],
    thresholds: dict[str, float],
    zeros: int,
) -> dict[str, int]:
    """Exactly ``zeros`` zeros over the block's layers: the ``zeros`` smallest keys
    m / t_l - 1 (the whole-model landing of :mod:`fcpts.landing`: one shared offset c of
    the learned thresholds), found by bisection on c over each layer's sorted scores
    instead of one concatenation of every key; ties at the final offset go to the layers
    in order."""
    ordered = {n: torch.sort(s.reshape(-1).double()).values for n, s in scores.items()}

    def below(c: float, strict: bool) -> dict[str, int]:
        return {
            layer.name: int(
                torch.searchsorted(
                    ordered[layer.name],
                    torch.tensor([thresholds[layer.name] * (1.0 + c)], dtype=torch.float64),
                    right=not strict,
                )
            )
            for layer in layers
        }

    lo, hi = -1.0, 1.0
    while sum(below(hi, False).values()) < zeros:
        hi = 2 * hi + 1
    for _ in range(200):  # the smallest c whose count reaches ``zeros``
        mid = 0.5 * (lo + hi)
        if sum(below(mid, False).values()) >= zeros:
            hi = mid
        else:
            lo = mid
    counts, upto = below(hi, True), below(hi, False)
    short = zeros - sum(counts.values())
    for layer in layers:
        take = min(short, upto[layer.name] - counts[layer.name])
        counts[layer.name] += take
        short -= take
    return counts


def learned_zeros(scores: dict[str, torch.Tensor], thresholds: dict[str, float]) -> int:
    """How many scores lie at or below their layer's learned threshold."""
    return sum(int((s <= thresholds[n]).sum()) for n, s in scores.items())


@torch.no_grad()
def prune_block(
    block: nn.Module,
    layers: Sequence[LayerSpec],
    scores: dict[str, torch.Tensor],
    counts: dict[str, int],
    stats: BlockStats,
    cfg: BlockwiseConfig,
) -> None:
    """Zero ``counts[name]`` weights of each layer in place: the OBS sweep (SparseGPT) on
    the block's input Hessians, or the lowest-scored weights with ``reconstruct="none"``.

    ``scores`` and ``stats`` are used up, to keep the peak memory low: the OBS path needs
    no scores, and each input's Hessian becomes its inverse factor in its own memory, is
    factorised once for the layers it feeds (q/k/v, gate/up) and freed after the last."""
    if cfg.reconstruct != "obs":
        for layer in layers:
            order = torch.sort(scores.pop(layer.name).reshape(-1), stable=True).indices
            block.get_submodule(layer.name).weight.view(-1)[order[: counts[layer.name]]] = 0
        return
    scores.clear()
    todo = [layer for layer in layers if counts[layer.name] > 0]
    factors = {}
    for j, layer in enumerate(todo):
        weight = block.get_submodule(layer.name).weight
        key = stats.source[layer.name]
        if key not in factors:
            h = obs.hessian(stats.xtx.pop(key)[0], stats.samples[key], overwrite=True)
            h = h.to(obs.work_dtype(weight))
            factors[key] = obs.inverse_cholesky(h, cfg.damp, overwrite=True)
            del h
        factor = factors[key]
        if all(stats.source[later.name] != key for later in todo[j + 1 :]):
            del factors[key]  # the last layer of this input: freed when it is pruned
        mat = obs.weight_matrix(layer, weight)[0]
        obs.prune_factored(mat, factor, counts[layer.name], blocksize=cfg.blocksize, inplace=True)
        del factor
