"""Evaluation helpers: sparsity counted from the weights, task metrics, BN recalibration."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .layers import LayerSpec
from .tasks import Task, to_device


def count_sparsity(model: nn.Module, layers: Sequence[LayerSpec]) -> dict[str, Any]:
    """Zeros per layer and overall, counted from the weights themselves."""
    found = state_zeros(model.state_dict(), [layer.name for layer in layers])
    zeros = sum(c["zeros"] for c in found)
    total = sum(c["numel"] for c in found)
    per_layer = {c["name"]: {k: c[k] for k in ("zeros", "numel", "sparsity")} for c in found}
    return {"zeros": zeros, "prunable": total, "sparsity": zeros / total, "layers": per_layer}


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


@torch.no_grad()
def state_zeros(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> list[dict[str, Any]]:
    """Zeros per prunable layer (by module name), counted in a state_dict's weights."""
    out = []
    for name in names:
        key = f"{name}.weight" if name else "weight"
        if key not in state:
            raise UserError(f"the sparse model has no weight {key!r} that its manifest lists")
        w = state[key]
        zeros = int((w == 0).sum())
        out.append(
            {"name": name, "numel": w.numel(), "zeros": zeros, "sparsity": zeros / w.numel()}
        )
    return out


def sparsity_figures(layers: Sequence[Mapping[str, Any]], target: float) -> dict[str, Any]:
    """The global figures of per-layer counts: zeros, prunable, achieved sparsity, whether
    it is exactly round(target x N), and the layers pruned to 100%."""
    zeros = sum(layer["zeros"] for layer in layers)
    prunable = sum(layer["numel"] for layer in layers)
    return {
        "achieved_sparsity": zeros / prunable,
        "zeros": zeros,
        "prunable": prunable,
        "exact": zeros == round_half_up(target * prunable),
        "empty_layers": [layer["name"] for layer in layers if layer["zeros"] == layer["numel"]],
    }


@torch.no_grad()
def outputs(
    model: nn.Module, task: Task, batches: Iterable, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """The task outputs of ``model`` over ``batches``, concatenated on the CPU."""
    model.eval()
    outs = []
    for batch in batches:
        batch = to_device(batch, device)
        outs.append(task.output(task.run(model, batch), batch).float().cpu())
    return torch.cat(outs)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels.to(logits.device)).float().mean())


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.float(), b.float(), dim=-1).mean())


def neighbour_agreement(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    """Fraction of items whose nearest neighbour (cosine, excluding itself) is unchanged."""

    def nn_index(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x.float(), dim=-1)
        sim = x @ x.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(-1)

    return float((nn_index(dense) == nn_index(sparse)).float().mean())


def relative_output_mse(dense: torch.Tensor, sparse: torch.Tensor) -> float:
    return float((sparse - dense).pow(2).sum() / dense.pow(2).sum().clamp_min(1e-12))


@torch.no_grad()
def recalibrate_batchnorm(
    model: nn.Module, task: Task, batches: Iterable, device: str | torch.device = "cpu"
) -> int:
    """Re-estimate BatchNorm running statistics on ``batches``; returns how many BN layers."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    was_training = model.training
    model.train()
    try:
        for batch in batches:
            task.run(model, to_device(batch, device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return len(bns)
