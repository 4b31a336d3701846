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
