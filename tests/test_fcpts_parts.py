"""The mathematical pieces of the fcpts allocator, each alone, on cases checked by hand."""

import copy
import math

import pytest
import torch
from torch import nn

from fcpts.alloc import get_allocator
from fcpts.alloc.learning import (
    Learner,
    LoopState,
    make_optimizer,
    restore,
    set_lr,
    snapshot,
    step,
)
from fcpts.alloc.objective import (
    constraint_loss,
    global_sparsity,
    loss_scale,
    next_lam,
    reconstruction_loss,
    total_loss,
)
from fcpts.alloc.reconstruction import (
    block_modules,
    captured,
    make_student,
    teacher_outputs,
)
from fcpts.alloc.thresholds import (
    THETA_LIMIT,
    init_thresholds,
    initial_sparsities,
    layer_mask,
    positive_median,
    threshold_at,
)
from fcpts.bridge import ScoreDistribution
from fcpts.errors import UserError
from fcpts.layers import LayerSpec, find_prunable
from fcpts.tasks import Task


def test_positive_median_and_threshold_at():
    assert positive_median(torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])) == 2.0
    assert positive_median(torch.zeros(4)) == 1.0  # no positive score: unit scale
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert threshold_at(values, 0.5) == 2.5  # between the 2nd and 3rd score
    assert threshold_at(values, 0.0) == 0.5  # below every score
    assert threshold_at(values, 1.0) == pytest.approx(4.0004)  # above every score


def test_initial_sparsities_uniform_respects_bounds():
    layers = [
        LayerSpec("a", "linear", (4, 4), max_sparsity=0.5),
        LayerSpec("b", "linear", (4, 4), min_sparsity=0.9),
        LayerSpec("c", "linear", (4, 4)),
    ]
    assert initial_sparsities(layers, 0.7, "uniform") == {"a": 0.5, "b": 0.9, "c": 0.7}


def _thresholds(layers, scores, sparsities):
    return init_thresholds(
        layers,
        scores,
        sparsities,
        kde_samples=4096,
        bridge="kde",
        ste_width=2.0,
        generator=torch.Generator().manual_seed(0),
        device=torch.device("cpu"),
    )


def test_init_thresholds_hand_checked():
    layers = [LayerSpec("a", "linear", (2, 2), min_sparsity=0.25), LayerSpec("b", "linear", (1, 2))]
    scores = {"a": torch.tensor([[4.0, 1.0], [3.0, 2.0]]), "b": torch.tensor([[1.0, 2.0]])}
    th = _thresholds(layers, scores, {"a": 0.5, "b": 0.5})
    # layer a: sorted 1 2 3 4, ref = median positive = 3, t = 2.5, theta = log(2.5 / 3)
    assert th.ref.tolist() == [3.0, 2.0]
    assert th.theta[0].item() == pytest.approx(math.log(2.5 / 3))
    assert th.values().tolist() == pytest.approx([2.5, 1.5])
    # a's min sparsity 0.25 puts its lower bound at t = 1.5; b is unbounded
    assert th.lo.tolist() == pytest.approx([math.log(1.5 / 3), -THETA_LIMIT])
    assert th.hi.tolist() == pytest.approx([THETA_LIMIT, THETA_LIMIT])
    assert th.widths[0] == pytest.approx(2.0 * th.dists[0].bandwidth)
    with torch.no_grad():
        th.theta.fill_(-100.0)
    th.clamp_()
    assert th.values().tolist() == pytest.approx([1.5, 2.0 * math.exp(-THETA_LIMIT)])
    assert th.final()["a"] == pytest.approx(1.5)


def test_layer_mask_forward_hard_backward_sigmoid():
    scores = torch.tensor([0.0, 1.0])
    t = torch.tensor(0.5, requires_grad=True)
    mask = layer_mask(scores, t, 1.0, straight_through=True)
    assert mask.tolist() == [0.0, 1.0]
    mask.sum().backward()
    s = torch.sigmoid(torch.tensor(0.5)).item()
    # d/dt sigmoid(m - t) = -s(1 - s) at m - t = +-0.5, the same for both scores
    assert t.grad.item() == pytest.approx(-2 * s * (1 - s))
    plain = layer_mask(scores, t, 1.0, straight_through=False)
    assert plain.tolist() == [0.0, 1.0] and not plain.requires_grad


def test_global_sparsity_exact_forward_bridged_backward():
    a = ScoreDistribution(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    b = ScoreDistribution(torch.tensor([1.0, 2.0]))
    t = torch.tensor([2.5, 10.0], requires_grad=True)
    # (0.5 * 4 + 1.0 * 2) / 8: two more weights in a keep-dense layer count in N only
    s = global_sparsity(t, [a, b], [4, 2], 8)
    assert s.item() == 0.5
    s.backward()
    assert t.grad[0].item() == pytest.approx(a.density(torch.tensor(2.5)).item() * 4 / 8)


def test_constraint_scale_total_and_lam():
    assert constraint_loss(torch.tensor(-0.1), "l1").item() == pytest.approx(0.1)
    assert constraint_loss(torch.tensor(-0.1), "l2").item() == pytest.approx(0.01)
    assert loss_scale(2.0, True) == 2.0
    assert loss_scale(0.0, True) == 1.0 and loss_scale(2.0, False) == 1.0
    assert total_loss(torch.tensor(3.0), 2.0, 4.0, torch.tensor(0.5)).item() == 3.5
    assert next_lam(1.0, 0.1, 1.0, 0.002) == pytest.approx(1.05)  # off target: grow
    assert next_lam(2.0, 0.0, 1.0, 0.002) == pytest.approx(2.0 / 1.05)  # on target: relax
    assert next_lam(1.0, -0.001, 1.0, 0.002) == 1.0  # never below the set value


def test_reconstruction_loss_output_and_blocks():
    task = Task()
    out, teacher = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 2.0]])
    blocks = {"b": torch.tensor([0.0, 0.0])}
    teacher_blocks = {"b": torch.tensor([3.0, 4.0])}
    # relative MSE of the output: 1 / 5; of the block (zeros vs the teacher): 1
    loss = reconstruction_loss(task, out, out, teacher, blocks, teacher_blocks, 2.0, 0.5)
    assert loss.item() == pytest.approx(2.0 * 0.2 + 0.5 * 1.0)
    assert reconstruction_loss(task, out, out, teacher, {}, {}, 1.0, 9.0).item() == pytest.approx(
        0.2
    )


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 2))


def test_student_trains_weights_biases_norms_outside_keep_dense():
    net = _net()
    layers = find_prunable(net, keep_dense=("3",))
    student = make_student(net, layers, reconstruct=True)
    assert list(student.weights) == ["0"]
    assert sorted(student.extra) == ["0.bias", "1.bias", "1.weight", "3.bias"]
    assert "param.3.weight" not in student.trained()  # keep-dense weight stays frozen
    assert all(p.requires_grad for p in net.parameters())  # the teacher is untouched
    frozen = make_student(net, layers, reconstruct=False)
    assert frozen.extra == {} and frozen.trained() == {}
    with pytest.raises(UserError, match="matches no module"):
        block_modules(net, ("nope",))


def test_captured_and_teacher_outputs():
    net = _net()
    modules = block_modules(net, ("1",))
    x = torch.randn(5, 3)
    with captured(modules, {}) as cache:
        net(x)
    assert torch.equal(cache["1"], net[1](net[0](x)))
    assert not net[1]._forward_hooks  # hooks removed after the block
    [(target, blocks)] = teacher_outputs(net, Task(), [x], modules)
    assert torch.equal(target, net(x)) and torch.equal(blocks["1"], cache["1"])


def _learner(**settings):
    cfg = get_allocator("fcpts", **settings).config
    net = _net()
    layers = find_prunable(net)
    scores = {layer.name: net.get_submodule(layer.name).weight.detach().abs() for layer in layers}
    th = _thresholds(layers, scores, {layer.name: 0.5 for layer in layers})
    student = make_student(net, layers, reconstruct=cfg.joint)
    optimizer, scheduler = make_optimizer(th.theta, student, cfg)
    batches = [torch.randn(6, 3, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return Learner(
        cfg=cfg,
        target=0.5,
        total=sum(layer.numel for layer in layers),
        thresholds=th,
        learn=layers,
        scores=[scores[layer.name] for layer in layers],
        student=student,
        task=Task(),
        batches=batches,
        teacher=teacher_outputs(net, Task(), batches, {}),
        blocks={},
        optimizer=optimizer,
        scheduler=scheduler,
    )


def test_optimizer_groups():
    learner = _learner(joint=False)
    assert [g["lr"] for g in learner.optimizer.param_groups] == [0.05]
    # relative steps: each trained parameter's rate is weight_lr times its own RMS
    learner = _learner(weight_lr=0.1)
    student = learner.student
    trained = list(student.weights.values()) + list(student.extra.values())
    groups = learner.optimizer.param_groups
    assert len(groups) == 1 + len(trained)
    rms = [float(p.detach().pow(2).mean().sqrt()) for p in trained]
    typical = sorted(rms[: len(student.weights)])[len(student.weights) // 2]
    assert 0.0 in rms  # an all-zero bias takes the typical weight RMS of the model
    for group, p, r in zip(groups[1:], trained, rms, strict=True):
        assert group["params"] == [p]
        assert group["lr"] == pytest.approx(0.1 * (r if r > 0 else typical))
    absolute = dict(weight_lr=1e-3, weight_step="absolute", weight_warmup=0)
    learner = _learner(**absolute, schedule="constant")
    assert {g["lr"] for g in learner.optimizer.param_groups} == {0.05, 1e-3}
    # the schedule: cosine from each phase's start, constant without one
    state = LoopState(lam=1.0, phase_start=10)
    set_lr(learner, state, 15, 10)
    assert {g["lr"] for g in learner.optimizer.param_groups} == {0.05, 1e-3}
    cosine = _learner(**absolute)
    set_lr(cosine, state, 15, 10)
    assert cosine.optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    set_lr(cosine, state, 10, 10)
    assert cosine.optimizer.param_groups[1]["lr"] == pytest.approx(1e-3)
    # the warm-up: weight rates ramp up over the phase's first iterations, thetas do not
    warm = _learner(**dict(absolute, weight_warmup=4), schedule="constant")
    for it, ramp in ((10, 0.25), (11, 0.5), (13, 1.0), (30, 1.0)):
        set_lr(warm, state, it, 40)
        lrs = [g["lr"] for g in warm.optimizer.param_groups]
        assert lrs[0] == 0.05 and lrs[1:] == [pytest.approx(1e-3 * ramp)] * (len(lrs) - 1), it
    # ... over at most a tenth of the phase: a 10-iteration phase starts at the full rate
    set_lr(warm, state, 10, 10)
    assert warm.optimizer.param_groups[1]["lr"] == pytest.approx(1e-3)


def test_one_step_records_the_start_and_moves_the_thresholds():
    learner = _learner(joint=False, lam_adapt=True, tolerance=1e-9)
    before = learner.thresholds.theta.detach().clone()
    state = LoopState(lam=1.0)
    record = step(learner, state, 0)
    # the initial thresholds sit at 50% in every layer: S = 0.5 exactly, L_c = 0
    assert record["global_sparsity"] == 0.5 and record["constraint_loss"] == 0.0
    # the student equals the teacher except for the masks: L_rec > 0, normalised to 1
    assert record["rec_loss"] > 0 and state.rec_scale == record["rec_loss"]
    assert record["loss"] == pytest.approx(1.0)
    assert state.lam == 1.0 and state.history == [record]  # on target: lam stays
    assert not torch.equal(before, learner.thresholds.theta)


def test_snapshot_restore_continues_identically():
    a = _learner()
    state_a = LoopState(lam=1.0)
    step(a, state_a, 0)
    # a stored checkpoint shares no tensor with the run that wrote it
    saved = copy.deepcopy(snapshot(a, state_a, 1, torch.device("cpu")))
    b = _learner()
    state_b = restore(b, saved, torch.device("cpu"))
    assert state_b.history == state_a.history and state_b.rec_scale == state_a.rec_scale
    assert step(a, state_a, 1) == step(b, state_b, 1)
    assert torch.equal(a.thresholds.theta, b.thresholds.theta)
    saved.tensors.pop("theta")
    with pytest.raises(UserError, match="lacks theta"):
        restore(_learner(), saved, torch.device("cpu"))
