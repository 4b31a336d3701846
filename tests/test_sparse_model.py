"""Saving and loading sparse models: safetensors + manifest, counts agree, corruption caught."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from fcpts.core import sparsify
from fcpts.errors import UserError
from fcpts.sparse_model import apply_allocation, load_sparse, manifest, save_sparse


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))


def test_round_trip_and_counts(tmp_path):
    model = _model()
    alloc = sparsify(model, 0.6, method="erk")
    sparse = apply_allocation(model, alloc)
    save_sparse(sparse, manifest(alloc), tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    state = load_file(str(tmp_path / "model.safetensors"))
    assert set(state) == set(model.state_dict())  # the source model's own names
    zeros = sum(int((state[f"{layer['name']}.weight"] == 0).sum()) for layer in data["layers"])
    assert zeros == data["zeros"] == round(0.6 * data["prunable"])
    assert data["exact"] and data["method"] == "erk" and data["score"] == "magnitude"
    loaded, _ = load_sparse(model, tmp_path)
    x = torch.randn(3, 6)
    assert torch.equal(loaded(x), sparse(x))
    assert not torch.equal(model(x), sparse(x))  # the original is untouched and different


def test_corrupt_file_is_refused(tmp_path):
    model = _model()
    alloc = sparsify(model, 0.5, method="uniform")
    save_sparse(apply_allocation(model, alloc), manifest(alloc), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-7] + b"garbage")
    with pytest.raises(UserError, match="does not match the sha256"):
        load_sparse(model, tmp_path)


def test_wrong_architecture_and_missing_manifest(tmp_path):
    model = _model()
    alloc = sparsify(model, 0.5, method="uniform")
    save_sparse(apply_allocation(model, alloc), manifest(alloc), tmp_path)
    with pytest.raises(UserError, match="does not fit this model"):
        load_sparse(nn.Sequential(nn.Linear(6, 3)), tmp_path)
    with pytest.raises(UserError, match="holds no manifest.json"):
        load_sparse(model, tmp_path / "nowhere")


def test_joint_reconstruction_changes_only_kept_weights():
    model = _model()
    batches = [
        {"x": torch.randn(16, 6, generator=torch.Generator().manual_seed(i))} for i in range(2)
    ]
    from fcpts.tasks import Task

    alloc = sparsify(
        model, 0.5, method="fcpts", task=Task(), batches=batches, settings={"iters": 10}
    )
    sparse = apply_allocation(model, alloc)
    for layer in alloc.layers:
        w = sparse.get_submodule(layer.name).weight
        assert int((w == 0).sum()) == layer.zeros
    frozen = sparsify(
        model,
        0.5,
        method="fcpts",
        task=Task(),
        batches=batches,
        settings={"iters": 10, "joint": False},
    )
    kept = apply_allocation(model, frozen)
    for layer in frozen.layers:
        w, w0 = kept.get_submodule(layer.name).weight, model.get_submodule(layer.name).weight
        m = frozen.masks[layer.name]
        assert torch.equal(w[m], w0[m])  # joint=False leaves the kept weights untouched


def test_same_seed_same_result():
    model = _model()
    batches = [{"x": torch.randn(16, 6, generator=torch.Generator().manual_seed(1))}]
    from fcpts.tasks import Task

    a = sparsify(
        model, 0.7, method="fcpts", task=Task(), batches=batches, settings={"iters": 15, "seed": 3}
    )
    b = sparsify(
        model, 0.7, method="fcpts", task=Task(), batches=batches, settings={"iters": 15, "seed": 3}
    )
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)
