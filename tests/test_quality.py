"""The learned allocation beats uniform magnitude on real models, on held-out data."""

import pytest
import torch

from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.metrics import mean_cosine, outputs, top1
from fcpts.sparse_model import apply_allocation


@pytest.fixture(scope="module")
def digits():
    return load_demo("demo:digits-cnn")


@pytest.fixture(scope="module")
def minilm():
    return load_demo("demo:minilm")


def test_digits_cnn_fcpts_beats_uniform_at_80(digits):
    calib = digits.split("calibration", 300, 64)
    held = digits.split("evaluation", 300, 100)
    labels = torch.cat([b["y"] for b in held])
    dense_acc = top1(outputs(digits.model, digits.task, held), labels)
    assert dense_acc > 0.95  # the demo model is really trained

    def accuracy(method):
        alloc = sparsify(
            digits.model, 0.8, method=method, task=digits.task, batches=calib, device="cpu"
        )
        assert alloc.zeros == int(0.8 * alloc.prunable + 0.5)
        return top1(outputs(apply_allocation(digits.model, alloc), digits.task, held), labels)

    uniform, learned = accuracy("uniform"), accuracy("fcpts")
    assert learned > uniform + 0.2, (learned, uniform)


@pytest.mark.slow
def test_minilm_fcpts_beats_uniform_at_80(minilm):
    calib = minilm.split("calibration", 64, 16)
    held = minilm.split("evaluation", 128, 64)
    dense = outputs(minilm.model, minilm.task, held)

    def cosine(method, settings=None):
        alloc = sparsify(
            minilm.model,
            0.8,
            method=method,
            task=minilm.task,
            batches=calib,
            selection=minilm.selection,
            settings=settings,
            device="cpu",
        )
        assert alloc.zeros == int(0.8 * alloc.prunable + 0.5)
        return mean_cosine(outputs(apply_allocation(minilm.model, alloc), minilm.task, held), dense)

    uniform = cosine("uniform")
    learned = cosine("fcpts", {"iters": 40})
    assert learned > uniform + 0.15, (learned, uniform)


def _tiny():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.ReLU(), torch.nn.Linear(32, 32), torch.nn.ReLU(),
        torch.nn.Linear(32, 6),
    )  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(32, 12, generator=gen) for _ in range(8)]
    return net, batches


def _held_losses(alloc):
    last = alloc.history[-1]
    return last["start_held_loss"], last["final_held_loss"], last["fell_back"]


def test_diverging_reconstruction_falls_back_to_its_start():
    """A huge weight step makes the joint reconstruction diverge: the held-out batches see
    it, learning stops early, and the result is the starting allocation (ERK masks, dense
    weights), marked in the history the manifest keeps."""
    from fcpts.tasks import Task

    net, batches = _tiny()
    settings = {"iters": 60, "weight_lr": 50.0, "eval_every": 2, "patience": 2, "obs_start": False}
    alloc = sparsify(net, 0.6, method="fcpts", score="magnitude", task=Task(), batches=batches,
                     settings=settings, device="cpu")  # fmt: skip
    start, final, fell_back = _held_losses(alloc)
    assert fell_back == 1.0 and final == start
    assert len(alloc.history) < 60  # stopped early
    assert alloc.weights is None and alloc.params is None  # the dense weights stay
    erk = sparsify(net, 0.6, method="erk", score="magnitude", device="cpu")
    assert alloc.zeros == erk.zeros == int(0.6 * alloc.prunable + 0.5)
    for name, mask in erk.masks.items():
        assert torch.equal(alloc.masks[name], mask), name


def test_reconstruction_keeps_its_best_iterate_and_the_obs_start():
    """A sane step: the result beats the start on the held-out batches, lands exactly, and
    (with the OBS start) its masks are OBS's, its weights zero where pruned."""
    from fcpts.tasks import Task

    net, batches = _tiny()
    for obs_start in (False, True):
        alloc = sparsify(net, 0.7, method="fcpts", score="magnitude", task=Task(),
                         batches=batches, settings={"iters": 40, "obs_start": obs_start},
                         device="cpu")  # fmt: skip
        start, final, fell_back = _held_losses(alloc)
        assert fell_back == 0.0 and final < start, (obs_start, start, final)
        assert alloc.zeros == int(0.7 * alloc.prunable + 0.5)
        assert alloc.weights is not None
        for name, mask in alloc.masks.items():  # OBS's weights are zero where it pruned
            assert not obs_start or not alloc.weights[name][~mask].any(), name
        obs_records = [h for h in alloc.history if "obs_held_loss" in h]
        assert len(obs_records) == int(obs_start)
