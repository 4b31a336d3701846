"""Layer-wise OBS reconstruction (SparseGPT: Frantar & Alistarh 2023, Algorithm 1).

A layer computes ``y = W x`` (per row of W). Pruning a set of weights and updating the
others to keep ``||W X - W_dense X||^2`` small over calibration inputs X is governed by the
Hessian H = 2 X X^T of that error. SparseGPT processes the columns of W left to right:
pruning weight (r, c) and compensating with the columns to its right is the optimal
partial OBS update ``delta = -(w_rc / [H_F^-1]_cc) [H_F^-1]_c,F``, where F are the columns
not yet processed. All the needed rows of H_F^-1 are the rows of the upper Cholesky factor
of H^-1 (scaled), so one factorisation serves every row and column. Updates are applied
lazily in blocks of ``blocksize`` columns, and the mask of each block is chosen when the
block is reached, by the OBS saliency w^2 / [H_F^-1]_cc on the updated weights.

H is dampened by ``damp`` times its mean diagonal; inputs that were always zero (dead
columns, diag(H) = 0) are decoupled and their weights pruned first, since on the
calibration data they cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UserError
from .layers import LayerSpec


def _same_padding(kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    pads = []
    for k, d in zip(kernel, dilation, strict=True):
        total = d * (k - 1)
        pads.append((total // 2, total - total // 2))
    return pads


def _conv_padding(module: nn.Module) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, as the convolution applies it."""
    padding = module.padding
    if padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if padding == "same":
        return _same_padding(module.kernel_size, module.dilation)
    return [(int(p), int(p)) for p in padding]


def conv_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input patches of a Conv1d/2d/3d: (groups, positions, in/groups * prod(kernel)).

    Column order matches ``weight.reshape(out, -1)`` within each group, so that the
    convolution equals ``patches @ weight_matrix(...)[g].T`` per group (bias aside).
    """
    nd = len(module.kernel_size)
    if x.dim() == nd + 1:
        x = x.unsqueeze(0)
    pads = _conv_padding(module)
    flat = [p for pair in reversed(pads) for p in pair]
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    for i, (k, s, d) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)
        if d > 1:
            x = x[..., ::d]
    channels = x.shape[1]
    order = (0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    rows = x.permute(order).reshape(-1, channels * math.prod(module.kernel_size))
    return rows.reshape(rows.shape[0], module.groups, -1).transpose(0, 1)


def layer_inputs(layer: LayerSpec, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight multiplies, as (groups, samples, columns of the weight matrix)."""
    x = x.detach()
    if layer.kind in ("linear", "hf_conv1d"):
        return x.reshape(1, -1, x.shape[-1])
    return conv_patches(module, x)


def matrix_shape(layer: LayerSpec) -> tuple[int, int, int]:
    """(groups, rows, columns) of :func:`weight_matrix` for this layer."""
    if layer.kind == "hf_conv1d":
        return 1, layer.shape[1], layer.shape[0]
    if layer.kind == "linear":
        return 1, layer.shape[0], layer.shape[1]
    return layer.groups, layer.shape[0] // layer.groups, layer.numel // layer.shape[0]


def weight_matrix(layer: LayerSpec, weight: torch.Tensor) -> torch.Tensor:
    """The weight as (groups, rows, columns): rows are outputs, columns inputs."""
    if layer.kind == "hf_conv1d":  # stored (in, out)
        return weight.t().unsqueeze(0)
    if layer.kind == "linear":
        return weight.unsqueeze(0)
    return weight.reshape(layer.groups, weight.shape[0] // layer.groups, -1)


def from_matrix(layer: LayerSpec, matrix: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`."""
    if layer.kind == "hf_conv1d":
        return matrix[0].t().contiguous()
    return matrix.reshape(layer.shape)


def accumulate(acc: torch.Tensor | None, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Add X^T X of ``inputs`` (groups, samples, d) to ``acc``; returns it and the samples."""
    x = inputs.float()
    xtx = torch.bmm(x.transpose(1, 2), x)
    return (xtx if acc is None else acc + xtx), x.shape[1]


def hessian(xtx: torch.Tensor, samples: int, *, overwrite: bool = False) -> torch.Tensor:
    """H = 2 X X^T / n from an accumulated X^T X over n samples; with ``overwrite`` in
    the memory of ``xtx`` (the same values: doubling is exact, the division the same)."""
    if overwrite:
        return xtx.mul_(2.0).div_(max(1, samples))
    return 2.0 * xtx / max(1, samples)


def share(total: int, size: int, lo: int, hi: int) -> int:
    """Share of ``total`` for the slots [lo, hi) of ``size``, in proportion to their
    number: the shares of consecutive ranges sum exactly to ``total``."""

    def upto(c: int) -> int:
        return (2 * total * c + size) // (2 * size)

    return upto(hi) - upto(lo)


def shares(total: int, sizes: list[int]) -> list[int]:
    """``total`` split over slots in proportion to ``sizes``, each share at most its size
    (largest remainders; the shares sum exactly to ``total``)."""
    whole = sum(sizes)
    if whole <= 0:
        return [0] * len(sizes)
    exact = [total * size / whole for size in sizes]
    out = [int(x) for x in exact]
    order = sorted(range(len(sizes)), key=lambda i: out[i] - exact[i])
    for i in order[: total - sum(out)]:
        out[i] += 1
    return out


def inverse_cholesky(
    h: torch.Tensor, damp: float, *, overwrite: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of (H + lambda I)^-1 with dead columns decoupled, and the
    dead columns. lambda = damp x mean diag(H), raised tenfold while factorisation fails.

    With ``overwrite`` H's memory is used as the work space (H is left changed). At most
    three matrices of H's size are alive at once: H, the factor and its inverse."""
    if not torch.isfinite(h).all():
        raise UserError(
            "the layer inputs seen during calibration hold NaN or infinite values: "
            "check the calibration data and the model"
        )
    if not overwrite:
        h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    diag = torch.diagonal(h)
    mean = float(diag.mean())  # on the strided view, as it always was: the same sum
    base = diag.clone()
    lam = damp * mean
    h.add_(0.0)  # what adding lambda I does off the diagonal (-0 becomes +0)
    for _ in range(12):
        diag.copy_(base + torch.tensor(lam, dtype=h.dtype, device=h.device))  # H + lambda I
        chol, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            del chol
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            del inv
            if int(info) == 0 and torch.isfinite(upper).all():
                return upper, dead
        lam = max(10 * lam, 1e-8 * mean)
    raise RuntimeError("the layer Hessian could not be factorised even with heavy dampening")


def _saliency(block: torch.Tensor, diag: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [H_F^-1]_cc of a block's columns; dead inputs cost nothing."""
    s = block.pow(2) / diag.pow(2).unsqueeze(0)
    return s.masked_fill(dead.unsqueeze(0), 0.0)


def _obs(
    w: torch.Tensor,
    upper: torch.Tensor,
    dead: torch.Tensor,
    blocksize: int,
    choose: Callable[[int, torch.Tensor], torch.Tensor],
    nm: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocked OBS sweep, in place on ``w``. ``choose(start, saliency)`` gives each
    block's prune mask (True = prune) from the saliency of its updated weights; with
    ``nm=(n, m)`` the n least salient of every m columns of a row are chosen as the sweep
    reaches them. Returns ``w`` and the keep-mask."""
    cols = w.shape[1]
    prune = torch.zeros_like(w, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        block = w[:, i1:i2].clone()
        u = upper[i1:i2, i1:i2]
        diag = torch.diagonal(u)
        dead_block = dead[i1:i2]
        err = torch.zeros_like(block)

        if nm is None:
            mask = choose(i1, _saliency(block, diag, dead_block))
        else:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                s = _saliency(
                    block[:, i : i + nm[1]], diag[i : i + nm[1]], dead_block[i : i + nm[1]]
                )
                idx = torch.topk(s, nm[0], dim=1, largest=False).indices
                mask.scatter_(1, idx + i, True)
            col = block[:, i]
            q = torch.where(mask[:, i], torch.zeros_like(col), col)
            e = (col - q) / diag[i]
            block[:, i:].addr_(e, u[i, i:], alpha=-1.0)
            block[:, i] = q
            err[:, i] = e
        w[:, i1:i2] = block
        prune[:, i1:i2] = mask
        if i2 < cols:
            w[:, i2:] -= err @ upper[i1:i2, i2:]
    return w, prune.logical_not_()


def work_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.promote_types(weight.dtype, torch.float32)


def _work_copy(weight: torch.Tensor, inplace: bool) -> torch.Tensor:
    """The weight in the working precision: itself with ``inplace`` when it already is,
    else a copy."""
    work = weight.to(work_dtype(weight))
    return work if inplace or work is not weight else work.clone()


def reconstruct(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
) -> torch.Tensor:
    """The OBS update of ``weight`` (rows, cols) for a fixed keep-``mask``: pruned weights
    become zero, the others compensate column by column (SparseGPT's partial updates)."""
    dtype = work_dtype(weight)
    upper, dead = inverse_cholesky(hessian.to(dtype), damp)
    pruned = ~mask.bool().to(weight.device)

    def choose(i1: int, saliency: torch.Tensor) -> torch.Tensor:
        return pruned[:, i1 : i1 + saliency.shape[1]].clone()

    new, _ = _obs(_work_copy(weight, False), upper, dead, max(1, int(blocksize)), choose)
    return new.to(weight.dtype)


def _checked(
    weight: torch.Tensor, zeros: int, blocksize: int, nm: tuple[int, int] | None
) -> tuple[int, int, tuple[int, int] | None]:
    """The count, block size and n:m pattern of a prune, checked against the weight."""
    rows, cols = weight.shape
    zeros = int(zeros)
    if not 0 <= zeros <= rows * cols:
        raise ValueError(f"zeros must be within [0, {rows * cols}], got {zeros}")
    blocksize = max(1, int(blocksize))
    if nm is not None:
        n, m = int(nm[0]), int(nm[1])
        if not 0 < n < m or cols % m:
            raise ValueError(
                f"an {n}:{m} pattern needs 0 < n < m and a column count ({cols}) divisible by m"
            )
        if zeros != rows * (cols // m) * n:
            raise ValueError(
                f"an {n}:{m} pattern prunes {rows * (cols // m) * n} weights, not {zeros}"
            )
        nm = (n, m)
        blocksize = max(m, blocksize // m * m)
    return zeros, blocksize, nm


def prune_layer(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    zeros: int,
    *,
    damp: float = 0.01,
    blocksize: int = 128,
    nm: tuple[int, int] | None = None,
    overwrite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune exactly ``zeros`` weights of ``weight`` (rows, cols) and update the rest.

    ``hessian`` is (cols, cols); ``overwrite`` lets its memory serve as work space. The
    count is split over the column blocks in proportion to their width (shares sum exactly
    to ``zeros``); within a block the weights with the lowest saliency w^2 / [H_F^-1]_cc go
    (adaptive: rows and columns of a block may differ). With ``nm=(n, m)`` every row loses
    n of each m consecutive columns instead, and ``zeros`` must be that pattern's count.
    Returns the new weight (pruned entries exactly 0) and the keep-mask.
    """
    _checked(weight, zeros, blocksize, nm)  # before the factorisation, which costs
    factor = inverse_cholesky(hessian.to(work_dtype(weight)), damp, overwrite=overwrite)
    return prune_factored(weight, factor, zeros, blocksize=blocksize, nm=nm)


def prune_factored(
    weight: torch.Tensor,
    factor: tuple[torch.Tensor, torch.Tensor],
    zeros: int,
    *,
    blocksize: int = 128,
    nm: tuple[int, int] | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_layer` with the Hessian already factorised (``factor`` is what
    :func:`inverse_cholesky` returns: layers that share their inputs share it). With
    ``inplace`` a float32/float64 ``weight`` is updated in its own memory."""
    rows, cols = weight.shape
    zeros, blocksize, nm = _checked(weight, zeros, blocksize, nm)
    upper, dead = factor
    choose = None
    if nm is None:
        # weights that are zero already are pruned first and count among the zeros; the
        # rest of the count goes to the blocks in proportion to their free weights
        forced = weight == 0
        starts = list(range(0, cols, blocksize))
        held = [int(forced[:, i : i + blocksize].sum()) for i in starts]
        if sum(held) > zeros:
            raise ValueError(f"the weight holds {sum(held)} zeros already, more than {zeros}")
        if not any(held):
            forced = None  # nothing to force: the mask is not kept through the sweep
        free = [rows * min(blocksize, cols - i) - h for i, h in zip(starts, held, strict=True)]
        extra = shares(zeros - sum(held), free)
        counts = {i: h + e for i, h, e in zip(starts, held, extra, strict=True)}

        def choose(i1: int, saliency: torch.Tensor) -> torch.Tensor:
            count = counts[i1]
            if forced is not None:
                saliency = saliency.masked_fill(forced[:, i1 : i1 + saliency.shape[1]], -1.0)
            flat = saliency.reshape(-1)
            mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
            if count > 0:
                mask[torch.topk(flat, count, largest=False).indices] = True
            return mask.reshape(saliency.shape)

    new, keep = _obs(_work_copy(weight, inplace), upper, dead, blocksize, choose, nm)
    if inplace and new is not weight:
        weight.copy_(new)
        new = weight
    return new.to(weight.dtype), keep


def prune_weight(
    layer: LayerSpec,
    weight: torch.Tensor,
    hessians: torch.Tensor,
    zeros: int,
    **options,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`prune_layer` on a layer's weight in its own layout (Linear, HF Conv1D,
    grouped convolutions: one Hessian per group, the count split exactly over groups)."""
    mats = weight_matrix(layer, weight.detach())
    groups = mats.shape[0]
    new, keep = [], []
    for g in range(groups):
        w, k = prune_layer(mats[g], hessians[g], share(zeros, groups, g, g + 1), **options)
        new.append(w)
        keep.append(k)
    if groups == 1:  # no copy of the weight and the mask into a stack of one
        return from_matrix(layer, new[0].unsqueeze(0)), from_matrix(layer, keep[0].unsqueeze(0))
    return from_matrix(layer, torch.stack(new)), from_matrix(layer, torch.stack(keep))
