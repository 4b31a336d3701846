"""Zeros are counted in the weights written: weights that are zero already are pruned
first, so every method writes exactly round(S* x N) zeros; layers pruned to 100% are
flagged; allocator settings are checked against their declared types."""

import dataclasses
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fcpts import report
from fcpts.alloc import METHODS, Problem, get_allocator
from fcpts.alloc.uniform import Uniform
from fcpts.core import LayerSelection, sparsify
from fcpts.errors import UserError
from fcpts.layers import find_prunable
from fcpts.sparse_model import apply_allocation, manifest, save_sparse
from fcpts.tasks import Task


def _model_with_zeros() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 3)
    )
    with torch.no_grad():
        w = model[2].weight
        w.view(-1)[torch.randperm(w.numel(), generator=torch.Generator().manual_seed(1))[:60]] = 0
        model[5].weight.zero_()  # an all-zero layer
    return model


def _batches():
    g = torch.Generator().manual_seed(2)
    return [{"x": torch.randn(8, 4, generator=g)} for _ in range(2)]


def _written_zeros(folder) -> tuple[int, dict]:
    data = json.loads((folder / "manifest.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    return sum(int((state[f"{x['name']}.weight"] == 0).sum()) for x in data["layers"]), data


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("score", ["magnitude", "wanda"])
def test_existing_zeros_are_pruned_and_counted(method, score, tmp_path):
    model = _model_with_zeros()
    settings = {"iters": 5} if method == "fcpts" else None
    for target in (0.3, 0.7):
        alloc = sparsify(
            model, target, method=method, score=score, task=Task(), batches=_batches(),
            settings=settings,
        )  # fmt: skip
        want = math.floor(target * alloc.prunable + 0.5)
        out = tmp_path / f"{target}"
        save_sparse(apply_allocation(model, alloc), manifest(alloc), out)
        written, data = _written_zeros(out)
        assert written == want == data["zeros"] == alloc.zeros, (method, target, written, want)
        assert data["exact"] and data["achieved_sparsity"] == want / alloc.prunable
        assert data["existing_zeros"] == 60 + 24
        # every weight that was zero is among the pruned ones
        for layer in alloc.layers:
            w0 = model.get_submodule(layer.name).weight
            assert not alloc.masks[layer.name][w0 == 0].any()


def test_existing_zeros_above_the_target_are_refused():
    model = _model_with_zeros()  # 84 zeros of 472 weights: 0.178
    with pytest.raises(UserError, match="already hold 84 zeros.*at least 0.178"):
        sparsify(model, 0.1, method="erk")


class _Reconstructing(Uniform):
    """Uniform, with "reconstructed" weights given at construction (not registered)."""

    name = ""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights

    def propose(self, problem):
        return dataclasses.replace(super().propose(problem), weights=self.weights)


def test_reconstructed_zeros_and_nans_are_written_as_counted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    w0 = model[0].weight.detach()
    plain = sparsify(model, 0.5, method="uniform")
    kept = plain.masks["0"].nonzero()[0].tolist()
    pruned = (~plain.masks["0"]).nonzero()[0].tolist()
    # a reconstruction that made a kept weight exactly zero and a pruned one NaN
    weights = w0.clone()
    weights[kept[0], kept[1]] = 0.0
    weights[pruned[0], pruned[1]] = float("nan")
    layers = find_prunable(model)
    alloc = _Reconstructing({"0": weights}).allocate(
        Problem(layers=layers, weights={"0": w0}, scores={"0": w0.abs()}, target=0.5)
    )
    assert not alloc.masks["0"][kept[0], kept[1]]  # the new zero is among the pruned
    sparse = apply_allocation(model, alloc)
    w = sparse[0].weight
    assert not torch.isnan(w).any()  # a pruned weight is 0 even where it was NaN
    assert int((w == 0).sum()) == 8 == alloc.zeros
    save_sparse(sparse, manifest(alloc), tmp_path)
    written, data = _written_zeros(tmp_path)
    assert written == data["zeros"] == 8 and data["exact"]


def test_manifest_counts_the_written_tensors(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    alloc = sparsify(model, 0.5, method="uniform")
    sparse = apply_allocation(model, alloc)
    with torch.no_grad():
        sparse[0].weight.fill_(0.0)  # whatever is written is what the manifest counts
    save_sparse(sparse, manifest(alloc), tmp_path)
    _, data = _written_zeros(tmp_path)
    assert data["zeros"] == 16 and data["layers"][0]["zeros"] == 16 and not data["exact"]
    assert data["empty_layers"] == ["0"]


def _empty_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[2].weight.mul_(1e-3)  # tiny weights: global magnitude prunes all of them
    return model


def test_layer_pruned_to_100_percent_is_flagged(tmp_path):
    model = _empty_model()
    alloc = sparsify(model, 0.6, method="global")
    assert alloc.empty_layers == ["2"]
    save_sparse(apply_allocation(model, alloc), manifest(alloc, {"task": "regression"}), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["empty_layers"] == ["2"]
    text = report.summary(manifest=data)
    assert "WARNING: 1 layer(s) pruned to 100%" in text and ": 2;" in text
    assert "emptiest  2 1.000" in text
    assert re.search(r"^task +regression$", text, re.M)
    quiet = sparsify(model, 0.6, method="uniform")
    save_sparse(apply_allocation(model, quiet), manifest(quiet), tmp_path / "q")
    data = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert data["empty_layers"] == [] and "WARNING" not in report.summary(manifest=data)


def _metrics(layers):
    zeros = sum(x["zeros"] for x in layers)
    prunable = sum(x["numel"] for x in layers)
    return {
        "metric": "top1", "dense": 1.0, "sparse": 0.1, "drop": 0.9, "task": "classifier",
        "target": 0.6, "achieved_sparsity": zeros / prunable, "zeros": zeros,
        "prunable": prunable, "exact": True, "layers": layers,
        "size": {"dense_bytes": 10, "sparse_bytes": 5, "format": "f", "ratio": 2.0},
        "latency": {"dense_ms": 1.0, "sparse_ms": 1.0, "batch_size": 1, "device": "cpu",
                    "threads": 1, "kernels": "k"},
        "evaluation": {"samples": 3, "data": "d", "overlap_with_calibration": 0},
    }  # fmt: skip


def test_report_and_summary_warn_and_name_the_task():
    layers = [
        {"name": "a", "numel": 10, "zeros": 2, "sparsity": 0.2},
        {"name": "head", "numel": 4, "zeros": 4, "sparsity": 1.0},
    ]
    metrics = _metrics(layers)
    manifest_data = {"method": "global", "score": "wanda", "task": "classifier"}
    for text in (
        report.render_markdown(metrics, manifest_data),
        report.render_html(metrics, manifest_data),
        report.summary(manifest=manifest_data, metrics=metrics),
    ):
        assert "WARNING: 1 layer(s) pruned to 100%" in text and "head" in text
        assert re.search(r"task +classifier", text)
    assert "Pruned hardest: head 1.000, a 0.200" in report.render_markdown(metrics, manifest_data)
    assert report.summary(metrics=metrics).startswith("task")
    decision = {"approved": True, "reasons": [], "task": "encoder"}
    assert report.summary(decision=decision).startswith("task  encoder")
    assert "WARNING" not in report.summary(metrics=_metrics(layers[:1]))


@pytest.mark.parametrize(
    ("method", "settings", "message"),
    [
        ("fcpts", {"lam": [1, 2]}, r"fcpts setting lam must be a number, got \[1, 2\]"),
        ("fcpts", {"iters": 2.5}, "fcpts setting iters must be a whole number, got 2.5"),
        ("fcpts", {"iters": True}, "iters must be a whole number, got True"),
        ("fcpts", {"joint": "yes"}, "joint must be true or false, got 'yes'"),
        ("fcpts", {"init": 3}, "init must be a string, got 3"),
        ("fcpts", {"blocks": "features"}, "blocks must be a list of strings"),
        ("owl", {"m": {"a": 1}}, "owl setting m must be a number"),
    ],
)
def test_settings_checked_against_their_types(method, settings, message):
    with pytest.raises(UserError, match=message):
        get_allocator(method, **settings)


def test_settings_converted_to_their_types():
    cfg = get_allocator("fcpts", iters=30.0, lam=1, blocks=["a"]).config
    assert (cfg.iters, cfg.lam, cfg.blocks) == (30, 1.0, ("a",))
    assert type(cfg.iters) is int and type(cfg.lam) is float
    nested: list = [1]
    for _ in range(30):
        nested = [nested, nested]  # a huge value is shown abridged, fast
    with pytest.raises(UserError, match=r"lam must be a number, got \[\[\[") as err:
        get_allocator("fcpts", lam=nested)
    assert len(str(err.value)) < 200


@pytest.mark.parametrize("method", ["uniform", "erk", "fcpts"])
def test_existing_zeros_in_a_keep_dense_layer_count(method, tmp_path):
    model = _model_with_zeros()  # layer 5 is all zeros: kept dense, its 24 zeros stay
    selection = LayerSelection(keep_dense=("5",))
    settings = {"iters": 3} if method == "fcpts" else None
    alloc = sparsify(
        model, 0.5, method=method, task=Task(), batches=_batches(), selection=selection,
        settings=settings,
    )  # fmt: skip
    save_sparse(apply_allocation(model, alloc), manifest(alloc), tmp_path)
    written, data = _written_zeros(tmp_path)
    assert written == math.floor(0.5 * alloc.prunable + 0.5) == data["zeros"]
    assert data["layers"][-1]["zeros"] == 24 and data["exact"]
