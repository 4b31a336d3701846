"""Every allocator lands exactly on round(S* x N) zeros, within bounds; tiny hand-checked cases."""

import math
import random

import pytest
import torch
from torch import nn

from fcpts.alloc import METHODS
from fcpts.core import LayerSelection, sparsify
from fcpts.errors import UserError
from fcpts.metrics import count_sparsity
from fcpts.sparse_model import apply_allocation
from fcpts.tasks import ClassifierTask


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    c1, c2, h = rng.choice([3, 4, 8]), rng.choice([5, 8]), rng.choice([7, 16, 33])
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1, groups=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(c2 * 16, h),
        nn.ReLU(),
        nn.Linear(h, 3),
    )


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(8, 1, 4, 4, generator=g)} for _ in range(2)]


SELECTIONS = [
    LayerSelection(),
    LayerSelection(keep_dense=("7",)),
    LayerSelection(bounds={"0": (0.0, 0.3), "5": (0.5, 0.99)}),
    LayerSelection(min_sparsity=0.02, max_sparsity=0.995, exclude=("2",)),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(6))
def test_exact_landing_grid(method, seed):
    rng = random.Random(100 + seed)
    model = _model(seed)
    selection = SELECTIONS[seed % len(SELECTIONS)]
    for target in (0.05, rng.uniform(0.1, 0.9), 0.98):
        layers = selection.find(model)
        n = sum(layer.numel for layer in layers)
        if target * n > sum(layer.max_zeros() for layer in layers) or target * n < sum(
            layer.min_zeros() for layer in layers
        ):
            with pytest.raises(UserError):
                sparsify(
                    model,
                    target,
                    method=method,
                    task=ClassifierTask(),
                    batches=_batches(seed),
                    selection=selection,
                )
            continue
        settings = {"iters": 5} if method == "fcpts" else None
        score = "wanda" if seed % 2 else "magnitude"
        alloc = sparsify(
            model,
            target,
            method=method,
            score=score,
            task=ClassifierTask(),
            batches=_batches(seed),
            selection=selection,
            settings=settings,
        )
        want = math.floor(target * n + 0.5)
        assert alloc.zeros == want and alloc.prunable == n
        sparse = apply_allocation(model, alloc)
        counted = count_sparsity(sparse, layers)
        # weights of a random model are never exactly zero, so counted zeros are the mask's
        assert counted["zeros"] == want
        for layer in layers:
            z = counted["layers"][layer.name]["zeros"]
            assert layer.min_zeros() <= z <= layer.max_zeros(), (layer.name, z)
            if layer.keep_dense:
                assert z == 0


def test_hand_checked_uniform_and_global():
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.1, -0.2], [0.3, 0.4]]))
        model[1].weight.copy_(torch.tensor([[5.0, -6.0], [7.0, 8.0]]))
    # global: the 4 smallest |w| overall are all in layer 0
    alloc = sparsify(model, 0.5, method="global")
    assert [layer.zeros for layer in alloc.layers] == [4, 0]
    # uniform: two zeros per layer, the smallest of each
    alloc = sparsify(model, 0.5, method="uniform")
    assert [layer.zeros for layer in alloc.layers] == [2, 2]
    assert alloc.masks["0"].tolist() == [[False, False], [True, True]]
    assert alloc.masks["1"].tolist() == [[False, False], [True, True]]


def test_hand_checked_erk():
    # ERK density ~ (in + out) / (in * out): a 2x2 layer gets 4/4 = 1, a 8x8 layer 16/64
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(8, 8, bias=False))
    alloc = sparsify(model, 0.5, method="erk")
    # eps * 1 would exceed 1 for the small layer: it stays dense, the big one takes all 34 zeros
    assert [layer.zeros for layer in alloc.layers] == [0, 34]


def test_wanda_uses_input_norms():
    model = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0]]))
    # the first input channel is 10x larger, so its weight scores 10 against 2
    batches = [{"x": torch.tensor([[10.0, 1.0]])}]
    alloc = sparsify(
        model, 0.5, method="uniform", score="wanda", task=ClassifierTask(), batches=batches
    )
    assert alloc.masks["0"].tolist() == [[True, False]]
    alloc = sparsify(model, 0.5, method="uniform", score="magnitude")
    assert alloc.masks["0"].tolist() == [[False, True]]
