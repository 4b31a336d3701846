"""OBS / SparseGPT layer-wise reconstruction: the update against brute-force least squares,
exact counts (also for singular Hessians), the layer-input layouts behind the Hessians,
and the ``sparsegpt`` method end to end on the digits demo, in the library and the CLI."""

import json

import pytest
import torch
from conftest import run_fcpts
from safetensors.torch import load_file
from torch import nn

from fcpts import obs
from fcpts.alloc import Allocator, Problem, Proposal
from fcpts.core import LayerSelection, sparsify
from fcpts.demos import load_demo
from fcpts.errors import UserError
from fcpts.layers import find_prunable
from fcpts.metrics import count_sparsity, outputs, top1
from fcpts.scores import compute_scores
from fcpts.sparse_model import apply_allocation


def _tiny(seed=0, rows=4, cols=8, samples=64):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x = torch.randn(cols, samples, generator=gen, dtype=torch.float64)
    x[1] += 0.7 * x[0]  # correlated inputs, so that the updates matter
    return w, x


def _lstsq(a, b):
    return torch.linalg.lstsq(a, b.unsqueeze(1)).solution[:, 0]


def test_obs_update_matches_brute_force_least_squares():
    w, x = _tiny()
    h = 2 * x @ x.T
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    new = obs.reconstruct(w, h, mask, damp=0.0, blocksize=3)  # 3 blocks: lazy updates cross them
    assert (new[~mask] == 0).all()
    # SparseGPT's update, by brute force: the columns are taken left to right; pruning one
    # refits all columns to its right by least squares with the columns so far held fixed
    expect = w.clone()
    for r in range(w.shape[0]):
        row = w[r].clone()
        for c in range(w.shape[1]):
            if not mask[r, c]:
                row[c] = 0
                if c + 1 < w.shape[1]:
                    target = x.T @ w[r] - x[: c + 1].T @ row[: c + 1]
                    row[c + 1 :] = _lstsq(x[c + 1 :].T, target)
        expect[r] = row
    assert torch.allclose(new, expect, atol=1e-5)

    # where each row's pruned weights precede its kept ones, that is the full least-squares
    # solution: min ||X^T w_kept - X^T w_dense||^2 over the kept weights of each row
    prefix = torch.ones_like(mask)
    for r, cut in enumerate((1, 3, 4, 6)):
        prefix[r, :cut] = False
    new = obs.reconstruct(w, h, prefix, damp=0.0, blocksize=3)
    for r in range(w.shape[0]):
        keep = prefix[r]
        best = _lstsq(x[keep].T, x.T @ w[r])
        assert torch.allclose(new[r, keep], best, atol=1e-5)
        assert (new[r, ~keep] == 0).all()


def test_prune_layer_lowers_the_error_against_plain_masking():
    w, x = _tiny(seed=3, rows=16, cols=24, samples=200)
    h = 2 * x @ x.T
    new, keep = obs.prune_layer(w, h, 192, blocksize=8)
    plain = w * keep
    err = ((new - w) @ x).pow(2).sum()
    assert err < ((plain - w) @ x).pow(2).sum()


@pytest.mark.parametrize("zeros", [0, 1, 13, 31, 95, 96])
def test_prune_layer_prunes_exactly_the_count(zeros):
    w, x = _tiny(rows=4, cols=24, samples=10)  # 10 samples < 24 inputs: H is singular
    x[5] = 0  # a dead input
    x[7] = x[6]  # duplicated inputs
    h = 2 * x @ x.T
    for damp in (0.0, 0.01):
        new, keep = obs.prune_layer(w, h, zeros, damp=damp, blocksize=5)
        assert int((~keep).sum()) == zeros
        assert torch.isfinite(new).all()
        assert (new[~keep] == 0).all()
        assert int((new == 0).sum()) == zeros
    if zeros >= 4 * 5:  # the dead input costs nothing: its block prunes it first
        assert not keep[:, 5].any()


def test_prune_layer_with_an_all_zero_hessian():
    w, _ = _tiny(rows=3, cols=10)
    new, keep = obs.prune_layer(w, torch.zeros(10, 10, dtype=torch.float64), 17)
    assert int((~keep).sum()) == 17 and torch.isfinite(new).all()


def test_prune_layer_two_of_four():
    w, x = _tiny(rows=6, cols=16, samples=50)
    new, keep = obs.prune_layer(w, 2 * x @ x.T, 48, nm=(2, 4), blocksize=6)
    assert ((~keep).reshape(6, 4, 4).sum(-1) == 2).all()
    assert (new[~keep] == 0).all()
    with pytest.raises(ValueError, match="prunes 48"):
        obs.prune_layer(w, 2 * x @ x.T, 40, nm=(2, 4))


def _sparsegpt_reference(w, h, zeros, damp, blocksize):
    """SparseGPT's Algorithm 1 written plainly, as the implementation stood before its
    memory was cut (H copied, lambda I added as a matrix, the weight cloned, the mask of
    held zeros always applied): the lean code must match it bit for bit."""
    h = h.clone()
    dead = torch.diagonal(h) <= 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    lam = damp * float(torch.diagonal(h).mean())
    chol = torch.linalg.cholesky(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
    u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    w, (rows, cols) = w.clone(), w.shape
    forced = w == 0
    starts = range(0, cols, blocksize)
    held = [int(forced[:, i : i + blocksize].sum()) for i in starts]
    free = [rows * min(blocksize, cols - i) - k for i, k in zip(starts, held, strict=True)]
    extra = obs.shares(zeros - sum(held), free)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1, count in zip(starts, map(sum, zip(held, extra, strict=True)), strict=True):
        i2 = min(i1 + blocksize, cols)
        block, ub = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        d = torch.diagonal(ub)
        sal = (block.pow(2) / d.pow(2).unsqueeze(0)).masked_fill(dead[i1:i2].unsqueeze(0), 0.0)
        flat = sal.masked_fill(forced[:, i1:i2], -1.0).reshape(-1)
        prune = torch.zeros(flat.numel(), dtype=torch.bool)
        prune[torch.topk(flat, count, largest=False).indices] = True
        prune = prune.reshape(sal.shape)
        err = torch.zeros_like(block)
        for i in range(i2 - i1):
            col = block[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(col), col)
            e = (col - q) / d[i]
            block[:, i:].addr_(e, ub[i, i:], alpha=-1.0)
            block[:, i], err[:, i] = q, e
        w[:, i1:i2], keep[:, i1:i2] = block, ~prune
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return w, keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("held", [False, True])
def test_lean_obs_is_bit_identical_to_the_plain_algorithm(dtype, held):
    w, x = _tiny(seed=4, rows=12, cols=40, samples=30)
    w, x = w.to(dtype), x.to(dtype)
    x[3] = 0  # a dead input
    if held:
        w[torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) < 0.1] = 0
    h = 2 * x @ x.T
    want_w, want_keep = _sparsegpt_reference(w, h, 250, 0.01, 16)
    got = [obs.prune_layer(w, h, 250, damp=0.01, blocksize=16)]
    got.append(obs.prune_layer(w, h.clone(), 250, damp=0.01, blocksize=16, overwrite=True))
    factor = obs.inverse_cholesky(h.clone(), 0.01, overwrite=True)
    inplace = w.clone()
    got.append(obs.prune_factored(inplace, factor, 250, blocksize=16, inplace=True))
    assert torch.equal(inplace, want_w)
    for new, keep in got:
        assert new.dtype == dtype
        assert torch.equal(new, want_w) and torch.equal(keep, want_keep)
    assert not torch.equal(w, want_w)  # the input is not changed but with ``inplace``


def _modules():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    return [
        (nn.Linear(6, 5), torch.randn(2, 3, 6)),
        (Conv1D(5, 6), torch.randn(2, 3, 6)),
        (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), torch.randn(2, 4, 11)),
        (nn.Conv2d(4, 8, 3, padding="same", dilation=2, groups=4), torch.randn(2, 4, 7, 6)),
        (
            nn.Conv2d(3, 5, (2, 3), stride=(2, 1), padding=1, padding_mode="reflect"),
            torch.randn(3, 7, 9),
        ),
        (nn.Conv3d(2, 3, 2, padding=1), torch.randn(1, 2, 3, 4, 3)),
    ]


@pytest.mark.parametrize("index", range(6))
def test_layer_inputs_reproduce_the_layer(index):
    module, x = _modules()[index]
    holder = nn.Sequential(module)
    (layer,) = find_prunable(holder)
    patches = obs.layer_inputs(layer, module, x)  # (groups, samples, columns)
    mat = obs.weight_matrix(layer, module.weight.detach())  # (groups, rows, columns)
    assert mat.shape == obs.matrix_shape(layer)
    assert torch.equal(obs.from_matrix(layer, mat), module.weight.detach())
    y = torch.cat([patches[g] @ mat[g].T for g in range(mat.shape[0])], dim=-1)
    with torch.no_grad():
        out = module(x)
    if layer.kind in ("linear", "hf_conv1d"):
        expect = out.reshape(-1, out.shape[-1]) - module.bias
    else:
        if x.dim() == len(layer.shape) - 1:  # unbatched input
            out = out.unsqueeze(0)
        expect = out.movedim(1, -1).reshape(-1, out.shape[1]) - module.bias
    assert torch.allclose(y, expect, atol=1e-5)


@pytest.fixture(scope="module")
def digits():
    demo = load_demo("demo:digits-cnn")
    evaluation = demo.split("evaluation", 300, 100)
    labels = torch.cat([b["y"] for b in evaluation])
    return demo, demo.split("calibration", 300, 64), evaluation, labels


def _top1(demo, allocation, evaluation, labels):
    sparse = apply_allocation(demo.model, allocation)
    return sparse, top1(outputs(sparse, demo.task, evaluation), labels)


def test_sparsegpt_lands_exactly_and_beats_uniform_magnitude(digits):
    demo, calibration, evaluation, labels = digits
    kw = dict(task=demo.task, batches=calibration, selection=demo.selection, device="cpu")
    layers = demo.selection.find(demo.model)
    total = sum(layer.numel for layer in layers)
    allocation = sparsify(demo.model, 0.7, method="sparsegpt", score="magnitude", **kw)
    sparse, ours = _top1(demo, allocation, evaluation, labels)
    counted = count_sparsity(sparse, layers)
    assert counted["zeros"] == allocation.zeros == int(0.7 * total + 0.5)
    for layer in allocation.layers:
        assert counted["layers"][layer.name]["zeros"] == layer.zeros
    # the base allocation is uniform: every layer at round(0.7 n) give or take landing's one
    for layer in allocation.layers:
        assert abs(layer.zeros - 0.7 * layer.numel) <= 1
    uniform = sparsify(demo.model, 0.7, method="uniform", score="magnitude", **kw)
    _, baseline = _top1(demo, uniform, evaluation, labels)
    assert ours > baseline + 0.1, (ours, baseline)
    assert demo.model.features[0].weight.count_nonzero() == demo.model.features[0].weight.numel()

    erk = sparsify(
        demo.model,
        0.7,
        method="sparsegpt",
        settings={"allocation": "erk", "blocks": ("features",)},
        **kw,
    )
    assert erk.zeros == allocation.zeros
    assert count_sparsity(apply_allocation(demo.model, erk), layers)["zeros"] == erk.zeros
    assert erk.sparsities() != allocation.sparsities()


def test_sparsegpt_explicit_sparsities_and_settings(digits):
    demo, calibration, _, _ = digits
    layers = demo.selection.find(demo.model)
    given = {layer.name: 0.5 for layer in layers}
    given[layers[0].name] = 0.0
    allocation = sparsify(
        demo.model,
        0.45,
        method="sparsegpt",
        score="magnitude",
        task=demo.task,
        batches=calibration,
        selection=demo.selection,
        settings={"allocation": given},
        device="cpu",
    )
    assert allocation.layers[0].zeros == 0
    assert allocation.zeros == int(0.45 * allocation.prunable + 0.5)
    with pytest.raises(UserError, match="lacks layer"):
        sparsify(
            demo.model,
            0.5,
            method="sparsegpt",
            task=demo.task,
            batches=calibration,
            settings={"allocation": {layers[0].name: 0.5}},
            device="cpu",
        )
    for bad, match in (
        ({"allocation": "magic"}, "allocation must be one of"),
        ({"nm": "4:2"}, "nm must look like"),
    ):
        with pytest.raises(UserError, match=match):
            sparsify(
                demo.model,
                0.5,
                method="sparsegpt",
                task=demo.task,
                batches=calibration,
                settings=bad,
            )


def test_sparsegpt_two_of_four(digits):
    demo, calibration, _, _ = digits
    selection = LayerSelection(exclude=("features.0",))  # 9 inputs per output: no 2:4
    # 124 is what YAML makes of an unquoted --set nm=2:4 (base 60)
    for nm in ("2:4", 124):
        allocation = sparsify(
            demo.model,
            0.5,
            method="sparsegpt",
            task=demo.task,
            batches=calibration,
            selection=selection,
            settings={"nm": nm},
            device="cpu",
        )
        assert allocation.settings["nm"] == "2:4"
        for layer in selection.find(demo.model):
            mat = obs.weight_matrix(layer, allocation.masks[layer.name])[0]
            assert ((~mat).reshape(mat.shape[0], -1, 4).sum(-1) == 2).all()
    with pytest.raises(UserError, match="cannot hold exactly"):
        sparsify(
            demo.model,
            0.5,
            method="sparsegpt",
            task=demo.task,
            batches=calibration,
            settings={"nm": "2:4"},
        )


class _WrongMasks(Allocator):
    name = ""  # not registered

    def propose(self, problem):
        masks = {layer.name: torch.ones(layer.shape, dtype=torch.bool) for layer in problem.layers}
        return Proposal(
            sparsities={layer.name: problem.target for layer in problem.layers}, masks=masks
        )


def test_proposed_masks_must_hold_the_landed_count(digits):
    demo = digits[0]
    layers = find_prunable(demo.model)
    weights = {layer.name: demo.model.get_submodule(layer.name).weight.detach() for layer in layers}
    problem = Problem(
        layers=layers, weights=weights, scores=compute_scores(weights, layers), target=0.5
    )
    with pytest.raises(RuntimeError, match="landing gives it"):
        _WrongMasks().allocate(problem)


def test_cli_allocate_with_sparsegpt(tmp_path):
    out = tmp_path / "sparse"
    r = run_fcpts(
        "allocate",
        "--model",
        "demo:digits-cnn",
        "--method",
        "sparsegpt",
        "--target",
        "0.7",
        "--no-tracking",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "sparsegpt" and m["exact"] and m["weights_reconstructed"]
    state = load_file(str(out / "model.safetensors"))
    zeros = sum(int((state[layer["name"] + ".weight"] == 0).sum()) for layer in m["layers"])
    assert zeros == m["zeros"] == int(0.7 * m["prunable"] + 0.5)
