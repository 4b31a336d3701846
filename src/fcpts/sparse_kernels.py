"""Sparse kernels for timing a pruned model: its Linear weights as CSR (CPU) or as 2:4
semi-structured tensors (CUDA), in a copy of the model; the original is left as it is."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .errors import UserError


class CSRLinear(nn.Module):
    """A Linear whose weight is a sparse CSR tensor; ``y = (W_csr @ x^T)^T + b``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "CSR support is in beta state"
            self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight_csr, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module | None]) -> int:
    """Replace each Linear of ``model`` for which ``make`` returns a module; the count."""
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        new = make(module)
        if new is None:
            continue
        if name == "":
            raise UserError("a bare Linear cannot have its weight replaced: wrap it in a module")
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        setattr(parent, name.rpartition(".")[2], new)
        count += 1
    return count


def csr_model(pruned: nn.Module) -> tuple[nn.Module, int]:
    """A copy of ``pruned`` whose Linear weights with zeros are CSR; and how many are."""
    net = copy.deepcopy(pruned).eval()
    count = replace_linears(net, lambda m: CSRLinear(m) if bool((m.weight == 0).any()) else None)
    return net, count


def is_two_four(weight: torch.Tensor) -> bool:
    """At most 2 nonzeros in every group of 4 consecutive input weights."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool(((weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def sparse_linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and bool((m.weight == 0).any())]


def pruned_two_four(model: nn.Module) -> bool:
    """Every Linear weight of ``model`` that has zeros is 2:4 (and one has)."""
    found = sparse_linears(model)
    return bool(found) and all(is_two_four(m.weight) for m in found)


def semi_structured_model(pruned: nn.Module, device: torch.device) -> tuple[nn.Module, int]:
    """A float16 copy of ``pruned`` on the CUDA ``device`` whose 2:4 Linear weights with
    zeros are ``torch.sparse.to_sparse_semi_structured`` tensors (those whose shape the
    kernels take; the others stay dense); and how many are.
    Needs a CUDA GPU (torch's semi-structured kernels run nowhere else)."""
    from torch.sparse import to_sparse_semi_structured

    net = copy.deepcopy(pruned).to(device, torch.float16).eval()

    def semi(m: nn.Linear) -> nn.Module | None:
        if not bool((m.weight == 0).any()) or not is_two_four(m.weight):
            return None
        try:
            weight = to_sparse_semi_structured(m.weight.detach())
        except (RuntimeError, ValueError):  # a shape the kernels do not take: stays dense
            return None
        m.weight = nn.Parameter(weight, requires_grad=False)
        return m

    return net, replace_linears(net, semi)
