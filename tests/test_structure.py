"""Unit groups and their physical removal: the shrunk model gives the masked model's outputs.

The tiny transformer is built from transformers.BertConfig with random weights (seeded), the
tiny CNNs are random too; the digits CNN is the real trained demo.
"""

import pytest
import torch
from torch import nn

from fcpts.errors import UserError
from fcpts.structure.shrink import NoHeads, shrink
from fcpts.structure.units import apply_masks, expand_masks, find_units


def masked(model, units, keep):
    import copy

    return apply_masks(copy.deepcopy(model), expand_masks(model, units, keep))


def tiny_bert():
    """A 2-layer BERT, hidden 16, 4 heads of size 4, FFN width 24, random weights (std 0.3)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=24,
        max_position_embeddings=32,
        initializer_range=0.3,
    )
    return BertModel(cfg).eval()


def bert_batch():
    torch.manual_seed(1)
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def test_bert_units_heads_and_ffn():
    model = tiny_bert()
    units = find_units(model)
    assert [g.name for g in units.groups] == [
        "encoder.layer.0.heads",
        "encoder.layer.0.ffn",
        "encoder.layer.1.heads",
        "encoder.layer.1.ffn",
    ]
    heads = units.group("encoder.layer.0.heads")
    assert (heads.kind, heads.count, heads.head_size) == ("head", 4, 4)
    # query/key/value rows and biases, attention.output.dense columns: 4 rows x 16 + 4 each
    assert {(m.tensor.split("layer.0.")[1], m.axis, m.width) for m in heads.members} == {
        ("attention.self.query.weight", 0, 4),
        ("attention.self.query.bias", 0, 4),
        ("attention.self.key.weight", 0, 4),
        ("attention.self.key.bias", 0, 4),
        ("attention.self.value.weight", 0, 4),
        ("attention.self.value.bias", 0, 4),
        ("attention.output.dense.weight", 1, 4),
    }
    assert units.group("encoder.layer.1.ffn").count == 24
    assert "pooler.dense" in {b.name for b in units.blocked}


def test_bert_shrunk_equals_masked():
    model = tiny_bert()
    units = find_units(model)
    keep = {
        "encoder.layer.0.heads": torch.tensor([1, 0, 1, 1]),
        "encoder.layer.0.ffn": torch.arange(24) % 3 == 0,  # 8 of 24 neurons
        "encoder.layer.1.heads": torch.tensor([0, 0, 0, 0]),  # every head gone
        "encoder.layer.1.ffn": torch.arange(24) < 20,
    }
    small = shrink(model, units, keep)
    batch = bert_batch()
    with torch.no_grad():
        want = masked(model, units, keep)(**batch).last_hidden_state
        got = small(**batch).last_hidden_state
        dense = model(**batch).last_hidden_state
    assert (got - want).abs().max() < 1e-5
    assert (dense - want).abs().max() > 1e-2  # the masks really changed the model
    l0, l1 = small.encoder.layer
    assert l0.attention.self.query.weight.shape == (12, 16)  # 3 heads x 4
    assert l0.attention.self.num_attention_heads == 3
    assert l0.attention.output.dense.weight.shape == (16, 12)
    assert l0.intermediate.dense.weight.shape == (8, 16)
    assert l0.output.dense.weight.shape == (16, 8)
    assert isinstance(l1.attention.self, NoHeads)
    assert l1.attention.output.dense.weight.shape == (16, 0)
    assert l1.intermediate.dense.weight.shape == (20, 16)
    n = sum(p.numel() for p in model.parameters())
    # removed: 1 head (3 x (16*4 + 4) + 16*4 = 268), 4 heads (4 x 268 = 1072),
    # 16 + 4 FFN neurons (16 + 1 + 16 = 33 each)
    assert sum(p.numel() for p in small.parameters()) == n - 268 - 1072 - 20 * 33


class Residual(nn.Module):
    """stem conv + BN, a residual conv + BN, a depthwise conv + BN, global pool, head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = nn.BatchNorm2d(8)
        self.expand = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.bn0(self.stem(x)))
        h = h + self.bn1(self.c1(h))
        h = torch.relu(self.bn2(self.dw(h)))
        h = torch.relu(self.expand(h))
        return self.head(h.mean((2, 3)))


def random_bn(model):
    torch.manual_seed(2)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.normal_()
            m.bias.data.normal_()
    return model.eval()


def test_residual_channels_form_one_group():
    torch.manual_seed(0)
    model = random_bn(Residual())
    units = find_units(model, (torch.randn(2, 3, 6, 6),))
    assert [(g.name, g.kind, g.count) for g in units.groups] == [
        ("stem", "channel", 8),
        ("expand", "channel", 6),
    ]
    stem = units.group("stem")
    owners = {(m.tensor, m.axis) for m in stem.members if not m.buffer}
    # stem and c1 write the same residual channels; c1 also reads them, so do dw and expand
    assert {("c1.weight", 0), ("c1.weight", 1), ("dw.weight", 0), ("expand.weight", 1)} <= owners
    assert {b.name: b.reason for b in units.blocked} == {"head": "it reaches the model's output"}


def test_residual_shrunk_equals_masked():
    torch.manual_seed(0)
    model = random_bn(Residual())
    x = torch.randn(5, 3, 6, 6)
    units = find_units(model, (x,))
    keep = {
        "stem": torch.tensor([1, 0, 1, 1, 0, 1, 0, 1]),
        "expand": torch.tensor([1, 1, 0, 1, 0, 1]),
    }
    small = shrink(model, units, keep)
    with torch.no_grad():
        want, got = masked(model, units, keep)(x), small(x)
    assert (got - want).abs().max() < 1e-5
    assert (model(x) - want).abs().max() > 1e-3
    assert small.stem.weight.shape == (5, 3, 3, 3)
    assert small.c1.weight.shape == (5, 5, 3, 3)
    assert (small.dw.weight.shape, small.dw.groups) == ((5, 1, 3, 3), 5)
    assert small.bn2.running_var.shape == (5,) and small.bn2.num_features == 5
    assert small.expand.weight.shape == (4, 5, 1, 1)
    assert small.head.weight.shape == (4, 4)


def test_digits_cnn_shrunk_equals_masked():
    from fcpts.demos import load_demo

    demo = load_demo("demo:digits-cnn")
    model = demo.model.eval()
    x = demo.split("calibration", 64, 64)[0]["x"]
    units = find_units(model, (x,))
    assert [(g.name, g.count) for g in units.groups] == [
        ("features.0", 16),
        ("features.3", 32),
        ("features.7", 64),
        ("classifier.1", 128),
    ]
    # the last conv's 64 channels reach Linear(256, 128) through a 2x2 flatten
    last = units.group("features.7")
    assert ("classifier.1.weight", 1, 4) in {(m.tensor, m.axis, m.width) for m in last.members}
    keep = {g.name: torch.arange(g.count) % 2 == 0 for g in units.groups}
    small = shrink(model, units, keep)
    with torch.no_grad():
        want, got = masked(model, units, keep)(x), small(x)
    assert (got - want).abs().max() < 1e-5
    assert small.classifier[1].weight.shape == (64, 128)  # 32 channels x 4, 64 neurons
    assert small.features[7].weight.shape == (32, 16, 3, 3)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 2, 1)
        self.b = nn.Conv2d(1, 2, 1)
        self.c = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.c(torch.cat([self.a(x), self.b(x)], 1))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else x


def test_unprovable_layers_are_blocked_with_a_reason():
    units = find_units(Concat(), (torch.randn(1, 1, 4, 4),))
    assert units.groups == ()
    reasons = {b.name: b.reason for b in units.blocked}
    assert "cat" in reasons["a"] and "cat" in reasons["b"]
    units = find_units(DataDependent(), (torch.randn(2, 3),))
    assert units.groups == ()
    assert units.blocked[0].reason.startswith("torch.fx could not trace the model")


def test_unit_mask_of_wrong_length_is_a_user_error():
    model = tiny_bert()
    units = find_units(model)
    with pytest.raises(UserError, match="has 3 entries, the group has 4 units"):
        expand_masks(model, units, {"encoder.layer.0.heads": torch.tensor([1, 0, 1])})
    with pytest.raises(UserError, match="unknown unit group"):
        shrink(model, units, {"nope": torch.tensor([1])})


# --- costs: params, flops (MACs per sample), bytes ---


class Hand(nn.Module):
    """Conv2d(1, 2, 3) on a 5x5 input -> 2x3x3 = 18 features -> Linear(18, 4) -> Linear(4, 3)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(18, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc(torch.relu(self.conv(x)).flatten(1))))


def test_costs_by_hand():
    from safetensors.torch import save_model

    from fcpts.structure.cost import model_cost, profile, unit_cost

    model = Hand().eval()
    x = torch.randn(4, 1, 5, 5)
    cost = model_cost(model, (x,))
    # params: conv 2*9 + 2 = 20, fc 18*4 + 4 = 76, out 4*3 + 3 = 15
    assert cost.params == 111
    # MACs per sample: conv 18 weights x 9 output pixels = 162, fc 72, out 12
    assert cost.flops == 246
    assert profile(model, (x,)).positions == {"conv": 9, "fc": 1, "out": 1}
    # bytes: 8-byte header length + JSON header + 111 float32 values, as written
    import struct
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, f"{tmp}/m.safetensors")
        with open(f"{tmp}/m.safetensors", "rb") as f:
            header = struct.unpack("<Q", f.read(8))[0]
    assert cost.bytes == 8 + header + 111 * 4
    units = find_units(model, (x,))
    conv, fc = units.group("conv"), units.group("fc")
    assert {b.name for b in units.blocked} == {"out"}
    prof = profile(model, (x,))
    # one conv channel: its 9 weights + bias, and 4 x 9 columns of fc; MACs 9*9 + 36
    assert [unit_cost(model, conv, b, prof) for b in ("params", "flops", "bytes")] == [
        46,
        117,
        184,
    ]
    # one fc neuron: 18 weights + bias, and one column of out; MACs 18 + 3
    assert [unit_cost(model, fc, b, prof) for b in ("params", "flops", "bytes")] == [22, 21, 88]
    small = shrink(model, units, {"conv": torch.tensor([0, 1]), "fc": torch.tensor([1, 0, 1, 1])})
    small_cost = model_cost(small, (x,))
    # the removed channel's 9 columns of the removed fc neuron are counted in both units
    assert (small_cost.params, small_cost.flops) == (111 - 46 - 22 + 9, 246 - 117 - 21 + 9)


def test_bert_flops_match_torch_flop_counter():
    """The hooks count every Linear and the two attention matmuls: torch's FlopCounterMode
    (2 FLOPs per MAC, batch 3) agrees on the tiny BERT, and removed units save exactly their
    cost."""
    from torch.utils.flop_counter import FlopCounterMode

    from fcpts.structure.cost import model_cost, profile, unit_cost

    model = tiny_bert()
    batch = bert_batch()
    prof = profile(model, (), batch)
    # per layer: q, k, v, o 4 x 16*16 x 7 tokens, QK^T and AV 2 x 7*7*16, FFN 2 x 16*24 x 7;
    # pooler 16*16 on the first token
    assert prof.macs == 2 * (4 * 16 * 16 * 7 + 2 * 7 * 7 * 16 + 2 * 16 * 24 * 7) + 16 * 16
    # torch's counter does not see inside CPU sdpa: count the eager attention (plain matmuls)
    model.set_attn_implementation("eager")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**batch)
    assert counter.get_total_flops() == 2 * prof.macs * 3
    model.set_attn_implementation("sdpa")
    units = find_units(model)
    keep = {
        "encoder.layer.0.heads": torch.tensor([1, 0, 0, 1]),
        "encoder.layer.1.ffn": torch.arange(24) >= 5,
    }
    small = shrink(model, units, keep)
    full, cut = model_cost(model, (), batch), model_cost(small, (), batch)
    for budget in ("params", "flops"):
        saved = 2 * unit_cost(model, units.group("encoder.layer.0.heads"), budget, prof)
        saved += 5 * unit_cost(model, units.group("encoder.layer.1.ffn"), budget, prof)
        assert full.of(budget) - cut.of(budget) == saved
    # 2 heads x (q, k, v: 4 rows x 16 + 4 biases; o: 16 x 4 columns), 5 neurons x (16 + 1 + 16)
    assert full.params - cut.params == 2 * (3 * (16 * 4 + 4) + 16 * 4) + 5 * 33
    assert 0 < full.bytes - cut.bytes - 4 * (full.params - cut.params) < 100


def test_unknown_budget_is_a_user_error():
    from fcpts.structure.cost import model_cost

    with pytest.raises(UserError, match="unknown budget 'latency'"):
        model_cost(Hand(), (torch.randn(1, 1, 5, 5),)).of("latency")
