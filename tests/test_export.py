"""ONNX export: onnxruntime (CPU) alone reproduces the torch outputs within 1e-4.

MiniLM and the digits CNN are the real demos (real weights); the shrunk transformer is the
tiny random BERT of test_structure with heads and FFN neurons cut out.
"""

import numpy as np
import pytest
import torch
from test_structure import bert_batch, tiny_bert

from fcpts.export.onnx import export_onnx, run_onnx
from fcpts.structure.shrink import shrink
from fcpts.structure.units import find_units


def onnx_inputs(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return [i.name for i in graph.input], [o.name for o in graph.output]


def test_digits_cnn_and_its_shrunk_model_run_in_onnxruntime(tmp_path):
    from fcpts.demos import load_demo

    demo = load_demo("demo:digits-cnn")
    model = demo.model.eval()
    x = demo.split("calibration", 64, 8)[0]["x"]
    units = find_units(model, (x,))
    small = shrink(model, units, {g.name: torch.arange(g.count) % 2 == 0 for g in units.groups})
    test = demo.split("evaluation", 37, 37)[0]["x"]  # another batch size than the example
    for name, m in (("dense", model), ("small", small)):
        path = export_onnx(m, tmp_path / name, (x,))
        assert path.name == "model.onnx"
        assert onnx_inputs(path) == (["x"], ["output"])
        with torch.no_grad():
            want = m(test).numpy()
        assert np.abs(run_onnx(path, {"x": test}) - want).max() < 1e-4
    assert (tmp_path / "small/model.onnx").stat().st_size < (
        tmp_path / "dense/model.onnx"
    ).stat().st_size


def test_shrunk_transformer_runs_in_onnxruntime(tmp_path):
    model = tiny_bert()
    units = find_units(model)
    keep = {
        "encoder.layer.0.heads": torch.tensor([1, 0, 1, 1]),
        "encoder.layer.0.ffn": torch.arange(24) % 3 == 0,
        "encoder.layer.1.heads": torch.tensor([0, 0, 0, 0]),  # every head gone: NoHeads
        "encoder.layer.1.ffn": torch.arange(24) < 20,
    }
    small = shrink(model, units, keep)
    path = export_onnx(small, tmp_path, (), bert_batch())
    assert onnx_inputs(path) == (
        ["input_ids", "attention_mask", "token_type_ids"],
        ["last_hidden_state"],
    )
    torch.manual_seed(3)
    ids = torch.randint(0, 50, (5, 11))  # other batch and sequence lengths than exported
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        want = small(**feeds).last_hidden_state.numpy()
    assert np.abs(run_onnx(path, feeds) - want).max() < 1e-4


@pytest.mark.slow
def test_minilm_runs_in_onnxruntime(tmp_path):
    from fcpts.demos import load_demo

    demo = load_demo("demo:minilm")
    model = demo.model.eval()
    path = export_onnx(model, tmp_path, (), demo.split("calibration", 4, 4)[0])
    for batch in (demo.split("validation", 16, 16)[0], demo.split("evaluation", 3, 3)[0]):
        with torch.no_grad():
            want = model(**batch).last_hidden_state.numpy()
        assert np.abs(run_onnx(path, batch) - want).max() < 1e-4
