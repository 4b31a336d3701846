"""fcpts.speed: dense and pruned timed side by side, interleaved, per engine.

Timings are noisy (a shared CPU), so the only speed assertion is where the pruned model
does 16x (or more) less work; everything else checks the structure of the result, the
interleaving, and the slower flag on results built by hand.
"""

from __future__ import annotations

import pytest
import torch
from test_structure import bert_batch, tiny_bert  # tests/test_structure.py
from torch import nn

from fcpts import speed
from fcpts.errors import UserError
from fcpts.sparse_kernels import CSRLinear, csr_model, is_two_four, pruned_two_four

ENGINE_KEYS = {"dense_ms", "pruned_ms", "dense_iqr_ms", "pruned_iqr_ms", "ratio", "slower"}


def _linear(n_in: int, n_out: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(n_in, n_out)).eval()


def test_a_sixteen_times_smaller_model_is_faster_on_torch_and_onnxruntime():
    dense, pruned = _linear(2048, 2048), _linear(2048, 128)
    x = torch.randn(8, 2048)
    result = speed.compare(
        dense, pruned, x, engines=("torch", "onnxruntime"), repeats=5, warmup=1, threads=1
    )
    assert set(result["engines"]) == {"torch", "onnxruntime"}, result["skipped"]
    assert result["batch_size"] == 8 and result["threads"] == 1
    assert result["order"].startswith("interleaved")
    for engine, r in result["engines"].items():
        assert ENGINE_KEYS <= set(r), engine
        assert r["order"] == "dp" * 5  # dense, pruned, dense, pruned ...
        assert r["repeats"] == 5 and r["threads"] == 1 and r["device"] == "cpu"
        assert r["ratio"] == pytest.approx(r["dense_ms"] / r["pruned_ms"])
        assert r["ratio"] > 1, (engine, r)
        assert not r["slower"]
    assert result["engines"]["onnxruntime"]["intra_op_threads"] == 1
    assert result["slower"] == []


def test_an_hf_dict_batch_is_timed_on_both_engines():
    model, batch = tiny_bert(), bert_batch()
    result = speed.compare(model, model, batch, repeats=3, warmup=1, threads=1)
    assert set(result["engines"]) == {"torch", "onnxruntime"}, result["skipped"]
    assert result["batch_size"] == 3
    for r in result["engines"].values():
        assert r["order"] == "dpdpdp"
        assert r["slower"] == (r["ratio"] < 1)  # the same model: either way, but consistent
        assert r["slower"] == speed.is_slower(r["ratio"])


def test_the_slower_flag_and_its_line_on_a_constructed_result():
    slow = speed.summarise({"dense": [0.010, 0.011, 0.009], "pruned": [0.020] * 3}, "dpdpdp")
    fast = speed.summarise({"dense": [0.030] * 3, "pruned": [0.010, 0.012, 0.011]}, "dpdpdp")
    assert slow["ratio"] == pytest.approx(0.5) and slow["slower"] is True
    assert fast["ratio"] == pytest.approx(30 / 11) and fast["slower"] is False
    assert slow["dense_iqr_ms"] == pytest.approx(1.0) and slow["pruned_iqr_ms"] == 0
    result = {"batch_size": 16, "engines": {"torch": fast, "onnxruntime": slow}, "skipped": {}}
    lines = speed.slower_lines(result)
    assert lines == [
        "the pruned model is 0.50x dense speed (slower) on onnxruntime: unstructured zeros "
        "do not speed up dense kernels; use --structure units"
    ]
    assert "semi-structured" in speed.slower_lines(result, "2:4")[0]
    assert "units" in speed.slower_lines(result, "units")[0]
    assert speed.ratio_line(result) == "torch 2.73x, onnxruntime 0.50x"
    assert speed.is_slower(0.999) and not speed.is_slower(1.0)
    assert not slow["within_spread"] and not fast["within_spread"]
    close = speed.summarise({"dense": [0.010, 0.012, 0.014], "pruned": [0.0125] * 3}, "dpdpdp")
    assert close["slower"] and close["within_spread"]  # 0.5 ms apart, IQR 2 ms
    noisy = {"batch_size": 16, "engines": {"torch": close}, "skipped": {}}
    assert "within the timing spread of 3 runs" in speed.slower_lines(noisy)[0]


def test_csr_linear_computes_the_linear_and_a_very_sparse_layer_times_faster():
    dense = _linear(2048, 2048)
    pruned = _linear(2048, 2048)
    with torch.no_grad():
        pruned[0].weight[torch.rand_like(pruned[0].weight) < 0.98] = 0
    x = torch.randn(3, 5, 2048)
    with torch.no_grad():
        assert torch.allclose(CSRLinear(pruned[0])(x), pruned(x), atol=1e-4)
    net, count = csr_model(pruned)
    assert count == 1 and isinstance(net[0], CSRLinear)
    assert isinstance(pruned[0], nn.Linear)  # the original is left as it is
    result = speed.compare(
        dense, pruned, torch.randn(8, 2048), engines=("torch-csr",), repeats=5, threads=1
    )
    r = result["engines"]["torch-csr"]
    assert r["csr_layers"] == 1 and r["order"] == "dp" * 5
    assert r["ratio"] > 1, r  # 50x fewer nonzeros


def test_an_engine_that_cannot_run_is_skipped_with_its_reason():
    dense = _linear(8, 8)
    result = speed.compare(dense, dense, torch.randn(2, 8), engines=("torch", "torch-csr"))
    assert set(result["engines"]) == {"torch"}
    assert "no Linear weight with zeros" in result["skipped"]["torch-csr"]


def test_two_four_is_recognised():
    w = torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 1, 0, 1, 1, 1, 0, 0]])
    assert is_two_four(w)
    w[0, 1] = 5.0  # three nonzeros in the first group
    assert not is_two_four(w)
    assert not is_two_four(torch.ones(2, 6))  # 6 inputs do not split in groups of 4
    model = _linear(8, 2)
    assert not pruned_two_four(model)  # no zeros at all
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 1, 0, 1, 1, 1, 0, 0]]))
    assert pruned_two_four(model)


def test_a_time_budget_stops_after_the_minimum_pairs():
    calls = []
    timed = speed.timed_pairs(
        lambda: calls.append("d"), lambda: calls.append("p"), repeats=50, warmup=2, seconds=0
    )
    assert timed["order"] == "dp" * speed.MIN_REPEATS
    assert calls == ["d", "p"] * (2 + speed.MIN_REPEATS)  # warm-up, then the timed pairs
    assert len(timed["times"]["dense"]) == len(timed["times"]["pruned"]) == speed.MIN_REPEATS


def test_bad_settings_are_user_errors():
    dense = _linear(4, 4)
    x = torch.randn(2, 4)
    with pytest.raises(UserError, match="unknown speed engine"):
        speed.compare(dense, dense, x, engines=("tensorrt",))
    with pytest.raises(UserError, match="repeats must be >= 1"):
        speed.compare(dense, dense, x, repeats=0)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            speed.compare(dense, dense, x, engines=("cuda",))
        assert speed.engines_for(("torch",), "auto", dense) == ["torch"]


def test_evaluate_reports_the_speed_up_per_engine_and_says_when_slower(tmp_path):
    from fcpts.steps import Sources, allocate, calibrate, evaluate

    digits = Sources(model="demo:digits-cnn")
    calibrate(digits, tmp_path / "cal", score="magnitude", samples=32, batch_size=32)
    allocate(tmp_path / "cal", tmp_path / "sparse", target=0.5, method="uniform", device="cpu")
    with pytest.raises(UserError, match="--latency-engines"):
        evaluate(digits, tmp_path / "sparse", tmp_path / "bad", latency_engines="torch,tpu")
    assert not (tmp_path / "bad").exists()  # refused before any work
    m = evaluate(
        digits, tmp_path / "sparse", tmp_path / "eval", samples=32, device="cpu", latency_seconds=0
    ).metrics
    lat = m["latency"]
    assert set(lat["engines"]) == {"torch", "onnxruntime"}, lat["skipped"]
    assert lat["engine"] == "torch" and lat["ratio"] == lat["engines"]["torch"]["ratio"]
    assert lat["dense_ms"] == lat["engines"]["torch"]["dense_ms"] > 0
    assert lat["speedup_onnxruntime"] == lat["engines"]["onnxruntime"]["ratio"]
    assert lat["batch_size"] == 16 and lat["runs"] == speed.MIN_REPEATS  # budget 0: the minimum
    # no export at all: allocate wrote the pruned model.onnx; the dense file is that graph
    # with the dense weights written in (the exporter folds each BatchNorm into its conv),
    # checked against torch on the batch
    assert lat["engines"]["onnxruntime"]["onnx_files"] == {
        "pruned": "given",
        "dense": "the pruned graph with these weights",
    }
    # timing noise decides the flag at 50% unstructured; its consequences are fixed
    slower = [e for e, r in lat["engines"].items() if r["ratio"] < 1]
    assert lat["slower_engines"] == slower and lat["slower"] == bool(slower)
    assert len(lat["notes"]) == len(slower)
    assert all("unstructured zeros do not speed up dense kernels" in n for n in lat["notes"])
