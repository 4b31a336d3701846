"""Bad input to the library: each a UserError whose message says what to fix."""

import pytest
import torch
from torch import nn

from fcpts.core import LayerSelection, sparsify
from fcpts.errors import UserError
from fcpts.tasks import ClassifierTask


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


@pytest.mark.parametrize("target", [0.0, 1.0, -0.1, 1.5, float("nan"), "high"])
def test_target_out_of_range(target):
    with pytest.raises(UserError, match="target sparsity"):
        sparsify(_mlp(), target, method="uniform")


def test_model_without_prunable_layer():
    with pytest.raises(UserError, match="no prunable layer"):
        sparsify(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.5, method="uniform")


def test_empty_calibration_set():
    with pytest.raises(UserError, match="calibration set is empty"):
        sparsify(_mlp(), 0.5, method="fcpts", task=ClassifierTask(), batches=[])


def test_fcpts_without_data():
    with pytest.raises(UserError, match="calibration"):
        sparsify(_mlp(), 0.5, method="fcpts")


def test_nan_weights_named():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="layer '2' has NaN"):
        sparsify(model, 0.5, method="uniform")


@pytest.mark.parametrize("field", ["include", "exclude", "keep_dense"])
def test_pattern_matching_nothing(field):
    selection = LayerSelection(**{field: ("encoder.*",)})
    with pytest.raises(UserError, match="matches no prunable layer"):
        sparsify(_mlp(), 0.5, method="uniform", selection=selection)


def test_unreachable_bounds_named():
    selection = LayerSelection(bounds={"0": (0.0, 0.0), "2": (0.0, 0.1)})
    with pytest.raises(UserError, match="allow at most"):
        sparsify(_mlp(), 0.5, method="uniform", selection=selection)
    selection = LayerSelection(min_sparsity=0.9)
    with pytest.raises(UserError, match="min-sparsity bounds force"):
        sparsify(_mlp(), 0.5, method="uniform", selection=selection)


def test_unknown_method_and_setting():
    with pytest.raises(UserError, match="unknown method 'magic'"):
        sparsify(_mlp(), 0.5, method="magic")
    with pytest.raises(UserError, match="no setting 'itters'"):
        sparsify(_mlp(), 0.5, method="fcpts", settings={"itters": 3})
    with pytest.raises(UserError, match="lam must be >= 0"):
        sparsify(_mlp(), 0.5, method="fcpts", settings={"lam": -1})


def test_unknown_score():
    with pytest.raises(UserError, match="unknown score"):
        sparsify(_mlp(), 0.5, method="uniform", score="taylor")
