"""Importance scores: one non-negative number per weight, higher means keep.

``magnitude`` is |w|. ``wanda`` (Sun et al., 2023) is |w_ij| * ||x_j||_2, with x_j the
j-th input channel of the layer over the calibration set; the input norms are gathered
once by :func:`collect_input_norms` and passed in, so scoring stays a pure function.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .errors import UserError
from .layers import LayerSpec

SCORES = ("magnitude", "wanda")


def needs_activations(score: str) -> bool:
    check_score(score)
    return score == "wanda"


def check_score(score: str) -> str:
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}: choose one of {', '.join(SCORES)}")
    return score


def _channel_scale(layer: LayerSpec, norms: torch.Tensor) -> torch.Tensor:
    """Broadcastable per-weight factor ||x_j|| for the weight of ``layer``."""
    shape = layer.shape
    if layer.kind == "hf_conv1d":  # weight (in, out)
        return norms.reshape(-1, 1)
    if layer.kind == "linear":
        return norms.reshape(1, -1)
    # convolutions: weight (out, in/groups, *kernel); input channel of (o, j) is
    # group(o) * in_per_group + j
    out_ch, in_per_group = shape[0], shape[1]
    groups = layer.groups
    idx = (torch.arange(out_ch) // (out_ch // groups)).unsqueeze(1) * in_per_group + torch.arange(
        in_per_group
    ).unsqueeze(0)
    scale = norms.to(idx.device)[idx]
    return scale.reshape(out_ch, in_per_group, *([1] * (len(shape) - 2)))


def compute_scores(
    weights: Mapping[str, torch.Tensor],
    layers: Iterable[LayerSpec],
    score: str = "magnitude",
    input_norms: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Scores for each layer, same shape as its weight, float32, detached."""
    check_score(score)
    out: dict[str, torch.Tensor] = {}
    for layer in layers:
        w = weights[layer.name].detach().float().abs()
        if score == "wanda":
            if input_norms is None or layer.name not in input_norms:
                raise UserError(
                    f"the wanda score needs calibration input statistics for layer {layer.name!r}; "
                    "collect them with collect_input_norms (the calibrate step does it)"
                )
            w = w * _channel_scale(layer, input_norms[layer.name].float().to(w.device))
        out[layer.name] = w
    return out


def _sum_squares(layer: LayerSpec, x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()
    if layer.kind in ("linear", "hf_conv1d"):
        return x.reshape(-1, x.shape[-1]).pow(2).sum(0)
    # conv input (B, C, *spatial) or unbatched (C, *spatial)
    dims_before = x.dim() - (len(layer.shape) - 2) - 1
    x = x.movedim(dims_before, 0)
    return x.reshape(x.shape[0], -1).pow(2).sum(1)


@torch.no_grad()
def collect_input_norms(
    model: nn.Module,
    layers: Iterable[LayerSpec],
    batches: Iterable,
    run: Callable[[nn.Module, object], object],
) -> dict[str, torch.Tensor]:
    """L2 norm of every input channel of every layer over ``batches``.

    ``run(model, batch)`` performs one forward pass; hooks record the layer inputs.
    """
    layers = list(layers)
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for layer in layers:
        module = model.get_submodule(layer.name)

        def hook(_mod, args, _out, layer=layer):
            sq = _sum_squares(layer, args[0])
            sums[layer.name] = sums[layer.name] + sq if layer.name in sums else sq

        handles.append(module.register_forward_hook(hook))
    try:
        for batch in batches:
            run(model, batch)
    finally:
        for h in handles:
            h.remove()
    missing = [layer.name for layer in layers if layer.name not in sums]
    if missing:
        raise UserError(
            f"layers {missing[:3]} saw no input during calibration: they are not on the "
            "forward path; exclude them"
        )
    return {name: s.sqrt() for name, s in sums.items()}
