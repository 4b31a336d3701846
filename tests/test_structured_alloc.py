"""Structured allocation: the exact cost model, landing in whole units, the unit view the
learned method masks through, the least-squares refit, N:M masks, and `fcpts allocate
--structure units` writing a smaller model that evaluate's loader rebuilds."""

import copy
import json

import pytest
import torch
from test_structure import Hand, bert_batch, masked, tiny_bert
from torch import nn

from fcpts.alloc import get_allocator
from fcpts.alloc.structured import UnitView, nm_mask, parse_structure
from fcpts.errors import UserError
from fcpts.structure.cost import model_cost, profile, units_cost_model
from fcpts.structure.refit import refit_consumers
from fcpts.structure.saved import rebuild, units_section
from fcpts.structure.shrink import shrink
from fcpts.structure.units import expand_masks, find_units
from fcpts.structured import shrink_to, sparsify_nm
from fcpts.tasks import EncoderTask, Task


def test_cost_model_counts_a_weight_shared_by_two_groups_once():
    """Hand: conv(1->2, 3x3) on 5x5 -> fc(18->4) -> out(4->3). fc's weight loses rows with
    fc's neurons and columns with conv's channels: the model's cost after removing one of
    each is exact, not the sum of the two units' costs."""
    model = Hand().eval()
    x = torch.randn(4, 1, 5, 5)
    units = find_units(model, (x,))
    flops = units_cost_model(model, units, "flops", profile(model, (x,)))
    params = units_cost_model(model, units, "params")
    nbytes = units_cost_model(model, units, "bytes")
    # every MAC is in a tensor units slice: conv 162, fc 72, out 12
    assert flops.full == 246
    # out.bias (3) is sliced by no unit
    assert (params.full, nbytes.full) == (108, 432)
    kept = {"conv": 1, "fc": 3}
    small = shrink(model, units, {"conv": torch.tensor([0, 1]), "fc": torch.tensor([1, 0, 1, 1])})
    cost = model_cost(small, (x,))
    assert flops.cost(kept) == cost.flops == 246 - 117 - 21 + 9
    assert params.cost(kept) == cost.params - 3 == 108 - 46 - 22 + 9
    assert nbytes.cost(kept) == 4 * params.cost(kept)
    # the first conv channel saves 117 MACs; with one fc neuron gone, only 117 - 9
    assert flops.marginal(flops.counts, "conv") == 117
    assert flops.marginal({"conv": 2, "fc": 3}, "conv") == 108


def test_unit_view_masks_like_expanded_weight_masks():
    model = tiny_bert()
    units = find_units(model)
    view = UnitView(units)
    keep = {g.name: torch.arange(g.count) % 3 != 1 for g in units.groups}
    layers = [type("L", (), {"name": g.name})() for g in units.groups]
    over = view.overrides(view.params(model), layers, [keep[g.name].float() for g in units.groups])
    want = expand_masks(model, units, keep)
    params = dict(model.named_parameters())
    assert set(over) == set(want)
    for name, w in over.items():
        assert torch.equal(w, params[name] * want[name])


def _bert_calibration():
    batch = bert_batch()
    return [batch, {k: v.flip(0) for k, v in batch.items()}]


@pytest.mark.parametrize("budget", ["params", "flops", "bytes"])
def test_units_land_to_one_unit_and_shrink_equals_masked(budget):
    model = tiny_bert()
    batches = _bert_calibration()
    task = EncoderTask()
    s = shrink_to(
        model,
        0.4,
        budget=budget,
        method="uniform",
        score="magnitude",
        task=task,
        batches=batches,
        device="cpu",
        refit=False,
    )
    a = s.allocation
    assert abs(a.achieved - 0.4) <= a.granularity / 2 + 1e-12
    assert s.section()["achieved"] == a.removed / a.total
    dense_cost, cut = model_cost(model, (), batches[0]), model_cost(s.model, (), batches[0])
    if budget != "bytes":  # bytes: plus a few header characters
        assert dense_cost.of(budget) - cut.of(budget) == a.removed
    with torch.no_grad():
        want = masked(model, s.units, a.keep)(**batches[0]).last_hidden_state
        got = s.model(**batches[0]).last_hidden_state
    assert (got - want).abs().max() < 1e-5
    # the manifest's units section rebuilds the same shapes from the dense model
    section = json.loads(json.dumps(units_section(s.units, a.keep, s.model)))
    rebuilt = rebuild(model, {"units": section})
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in s.model.state_dict().items()
    }


@pytest.mark.parametrize("method", ["global", "erk", "owl"])
def test_every_baseline_allocates_units(method):
    model = tiny_bert()
    s = shrink_to(
        model,
        0.5,
        budget="flops",
        method=method,
        score="wanda",
        task=EncoderTask(),
        batches=_bert_calibration(),
        device="cpu",
    )
    assert s.method == method
    assert abs(s.allocation.achieved - 0.5) <= s.allocation.granularity / 2 + 1e-12
    assert s.refitted  # every removed unit's consumer is refitted, whichever the method


def test_unit_multiple_keeps_widths_a_multiple_and_lands_to_one_block():
    model = tiny_bert()
    s = shrink_to(
        model,
        0.45,
        budget="flops",
        method="uniform",
        score="magnitude",
        task=EncoderTask(),
        batches=_bert_calibration(),
        device="cpu",
        unit_multiple=4,
    )
    kept = {name: int(k.sum()) for name, k in s.allocation.keep.items()}
    # FFN groups (24 neurons) keep a multiple of 4; head groups (4 < 2 x 4) go one by one
    assert all(kept[f"encoder.layer.{i}.ffn"] % 4 == 0 for i in (0, 1))
    assert s.model.encoder.layer[0].intermediate.dense.out_features % 4 == 0
    assert abs(s.allocation.achieved - 0.45) <= s.allocation.granularity / 2 + 1e-12


def test_learned_units_land_and_keep_a_unit_per_group():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [torch.randn(16, 6) for _ in range(3)]
    s = shrink_to(
        model.eval(),
        0.5,
        budget="flops",
        method="fcpts",
        score="wanda",
        task=Task(),
        batches=batches,
        settings={"iters": 15, "seed": 0},
        device="cpu",
    )
    assert abs(s.allocation.achieved - 0.5) <= s.allocation.granularity / 2 + 1e-12
    assert all(int(k.sum()) >= 1 for k in s.allocation.keep.values())
    assert s.model[0].out_features + s.model[2].out_features < 20
    assert len(s.allocation.proposal.history) == 15


def test_joint_reconstruction_keeps_the_refit_only_when_it_lowers_the_held_out_loss():
    """fcpts's jointly reconstructed weights go into the shrunk model as they are unless a
    least-squares refit lowers the loss on the held-out calibration batch; with --no-joint
    the consumers are refitted as for every baseline."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 2))
    batches = [torch.randn(16, 6) for _ in range(4)]
    common = dict(budget="flops", method="fcpts", score="wanda", task=Task(), batches=batches)
    settings = {"iters": 10, "holdout": 0.25}
    s = shrink_to(model.eval(), 0.5, settings=settings, device="cpu", refit=False, **common)
    assert (s.reconstruction, s.refitted) == ("joint", [])
    assert s.section()["reconstruction"] == "joint"
    learned = copy.deepcopy(model)
    with torch.no_grad():
        for name, value in s.allocation.proposal.weights.items():
            learned.get_parameter(name).copy_(value)
        for name, value in (s.allocation.proposal.params or {}).items():
            learned.get_parameter(name).copy_(value)
        want = masked(learned, s.units, s.allocation.keep)(batches[0])
        assert (s.model(batches[0]) - want).abs().max() < 1e-5
    chosen = shrink_to(model.eval(), 0.5, settings=settings, device="cpu", **common)
    assert chosen.reconstruction in ("joint", "joint + least-squares")
    assert bool(chosen.refitted) == (chosen.reconstruction != "joint")
    held = batches[-1]  # the held-out quarter

    def held_loss(m):
        with torch.no_grad():
            return float(Task().loss(m(held), model(held), held))

    assert held_loss(chosen.model) <= held_loss(s.model) + 1e-7
    plain = shrink_to(
        model.eval(), 0.5, settings={"iters": 10, "joint": False}, device="cpu", **common
    )
    assert plain.reconstruction == "least-squares" and plain.refitted


def test_refit_restores_the_output_when_a_removed_neuron_duplicates_a_kept_one():
    """Neurons 0 and 1 of the hidden layer are equal: without neuron 1 the least-squares
    refit of the output layer doubles neuron 0's column and the output is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = model[0].weight[0]
        model[0].bias[1] = model[0].bias[0]
    x = torch.randn(64, 3)
    units = find_units(model, (x,))
    keep = {"0": torch.tensor([True, False, True, True])}
    run = Task().run
    fitted = copy.deepcopy(model)
    assert refit_consumers(fitted, model, units, keep, [x], run) == ["2"]
    with torch.no_grad():
        plain = shrink(model, units, keep)(x)
        refit = shrink(fitted, units, keep)(x)
        dense = model(x)
    assert (plain - dense).abs().max() > 1e-2
    assert (refit - dense).abs().max() < 1e-3


def test_n_m_masks_keep_exactly_n_of_every_m():
    torch.manual_seed(0)
    scores = torch.rand(6, 16)
    keep = nm_mask(scores, 2, 4)
    groups = keep.reshape(6, 4, 4)
    assert (groups.sum(-1) == 2).all()
    # the two kept are the two highest of each group
    top = scores.reshape(6, 4, 4).topk(2, -1).indices
    assert groups.gather(-1, top).all()
    conv = nm_mask(torch.rand(3, 8, 2, 2), 1, 4)
    assert (conv.movedim(1, -1).reshape(-1, 4).sum(-1) == 1).all()


def test_2_4_lands_exactly_on_every_eligible_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4), nn.ReLU(), nn.Linear(4, 3))
    allocation, chosen = sparsify_nm(model, 0.5, 2, 4, method="uniform", score="magnitude")
    assert chosen == ["0", "2", "4"]
    for layer in allocation.layers:
        mask = allocation.masks[layer.name]
        assert (mask.reshape(-1, 4).sum(-1) == 2).all()
    assert allocation.achieved == 0.5
    # a lower target: the layers the allocation prunes most, as close as whole layers allow
    low, chosen = sparsify_nm(model, 0.2, 2, 4, method="uniform", score="magnitude")
    # 204 weights, 40.8 zeros wanted; layer "0" (the first of equals) gives 64: closer than
    # none, and adding "2" (32 more) or "4" (6 more) would overshoot further
    assert chosen == ["0"]
    assert low.zeros == 64 and abs(low.zeros - 40.8) <= 64 / 2


def test_bad_structures_are_user_errors():
    for bad in ("4:2", "2:0", "columns", "2-4"):
        with pytest.raises(UserError, match="unknown structure"):
            parse_structure(bad)
    assert parse_structure("2:4") == ("nm", 2, 4)
    model = tiny_bert()
    with pytest.raises(UserError, match="sparsegpt method solves for single weights"):
        shrink_to(
            model,
            0.5,
            method="sparsegpt",
            score="magnitude",
            task=EncoderTask(),
            batches=_bert_calibration(),
            device="cpu",
        )
    assert get_allocator("uniform").name == "uniform"


def test_allocate_units_through_the_cli_and_evaluate_loads_it(tmp_path, digits_calibration, capsys):
    from fcpts.cli import main
    from fcpts.demos import load_demo
    from fcpts.sparse_model import load_sparse

    out = tmp_path / "units"
    code = main(
        [
            "allocate",
            "--calibration",
            str(digits_calibration.path),
            "--out",
            str(out),
            "--structure",
            "units",
            "--budget",
            "flops",
            "--target",
            "0.5",
            "--method",
            "uniform",
            "--no-tracking",
            "--quiet",
        ]
    )
    assert code == 0
    data = json.loads((out / "manifest.json").read_text())
    s = data["structure"]
    assert (s["structure"], s["budget"], s["target"]) == ("units", "flops", 0.5)
    assert abs(s["achieved"] - 0.5) <= s["granularity"] / 2
    flops = s["whole_model"]["flops"]
    assert flops["dense"] - flops["shrunk"] == s["removed_cost"]
    assert s["reconstruction"] == "least-squares" and s["refitted"]  # uniform: --refit default
    demo = load_demo("demo:digits-cnn")
    small, manifest = load_sparse(demo.model, out)
    x = demo.split("evaluation", 32, 32)[0]["x"]
    assert small.features[0].out_channels < 16
    assert [list(small.get_submodule(m["name"]).weight.shape) for m in manifest["layers"]] == [
        m["shape"] for m in manifest["layers"]
    ]
    with torch.no_grad():
        assert small(x).shape == (32, 10)
    code = main(
        [
            "allocate",
            "--calibration",
            str(digits_calibration.path),
            "--out",
            str(tmp_path / "bad"),
            "--budget",
            "flops",
            "--target",
            "0.5",
            "--no-tracking",
            "--quiet",
        ]
    )
    assert code != 0
    assert "--budget flops needs --structure units" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
