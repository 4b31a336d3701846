"""The pipeline's step functions on real models and every kind of source."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fcpts.errors import ServiceError, UserError
from fcpts.export import sparse_format
from fcpts.sources import Sources, resolve_data, resolve_model, sample_digests, split_indices
from fcpts.sparse_model import load_state, sha256_file
from fcpts.steps import (
    Decision,
    allocate,
    calibrate,
    evaluate,
    gate,
    load_calibration,
    register,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _saved_zeros(sparse_dir, manifest):
    state, _ = load_state(sparse_dir)  # the folder's model file, whatever its format
    return {
        layer["name"]: int((state[f"{layer['name']}.weight"] == 0).sum())
        for layer in manifest["layers"]
    }


def test_calibration_artifact_describes_its_tensors(digits_calibration):
    cal = digits_calibration
    info = json.loads((cal.path / "calibration.json").read_text())
    assert info["format"] == "fcpts.calibration/1"
    assert info["sources"]["model"] == "demo:digits-cnn"
    assert info["samples"] == 96 and info["batches"] == 3 and info["batch_size"] == 32
    assert info["task"] == "classifier" and info["score"] == "wanda"
    assert info["tensors_sha256"] == sha256_file(cal.path / "calibration.safetensors")
    assert len(info["model"]["sha256"]) == 64 and len(info["sample_digests"]) == 96
    tensors = load_file(str(cal.path / "calibration.safetensors"))
    for name, shape in info["shapes"].items():
        assert list(tensors[name].shape) == shape
    assert tensors["batch.0.x"].shape == (32, 1, 8, 8)
    assert tensors["reference.0"].shape == (32, 10)  # dense logits
    demo = resolve_model("demo:digits-cnn")
    with torch.no_grad():
        logits = demo.model(cal.batches[0]["x"])
    torch.testing.assert_close(tensors["reference.0"], logits)
    assert set(info["input_norm_layers"]) == {
        "features.0",
        "features.3",
        "features.7",
        "classifier.1",
        "classifier.3",
    }

    loaded = load_calibration(cal.path)
    assert len(loaded.batches) == 3
    assert torch.equal(loaded.batches[1]["x"], cal.batches[1]["x"])
    assert torch.equal(loaded.reference[2], cal.reference[2])
    assert set(loaded.input_norms) == set(info["input_norm_layers"])


def test_corrupt_calibration_is_refused(digits_calibration, tmp_path):
    import shutil

    copy = tmp_path / "cal"
    shutil.copytree(digits_calibration.path, copy)
    with open(copy / "calibration.safetensors", "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage")
    with pytest.raises(UserError, match="does not match the sha256"):
        load_calibration(copy)
    with pytest.raises(UserError, match="does not exist"):
        load_calibration(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "method, score, settings",
    [
        ("uniform", "magnitude", {}),
        ("global", "magnitude", {}),
        ("erk", "magnitude", {}),
        ("owl", "wanda", {}),
        ("fcpts", "wanda", {"iters": 4}),
    ],
)
def test_allocate_every_method_lands_exactly(digits_calibration, tmp_path, method, score, settings):
    result = allocate(
        digits_calibration.path, tmp_path, target=0.6, method=method, score=score, settings=settings
    )
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["method"] == method and m["score"] == score and m["target"] == 0.6
    assert m["exact"] and m["zeros"] == round(0.6 * m["prunable"])
    assert m["achieved_sparsity"] == pytest.approx(0.6, abs=1 / m["prunable"])
    for key in ("target", "achieved_sparsity", "zeros", "prunable", "method", "score", "layers"):
        assert key in m
    saved = _saved_zeros(tmp_path, m)
    assert saved == {layer["name"]: layer["zeros"] for layer in m["layers"]}
    assert sum(saved.values()) == m["zeros"]
    # the whole state_dict under the model's own names, BatchNorm buffers included
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "features.1.running_mean" in state and "classifier.3.bias" in state
    assert m["calibration"]["sample_digests"] == digits_calibration.info["sample_digests"]
    assert result.allocation.achieved == m["achieved_sparsity"]


def test_allocate_refuses_a_different_model(digits_calibration, tmp_path):
    from fcpts.demos.digits import DigitsCNN

    other = resolve_model("demo:digits-cnn")
    torch.manual_seed(1)
    other.model = DigitsCNN().eval()
    with pytest.raises(UserError, match="not the one calibrated"):
        allocate(digits_calibration.path, tmp_path, target=0.5, method="uniform", resolved=other)


def test_wanda_needs_statistics(tmp_path):
    cal = calibrate(
        Sources(model="demo:digits-cnn"),
        tmp_path / "cal",
        samples=32,
        batch_size=32,
        score="magnitude",
    )
    assert cal.input_norms is None and cal.info["score"] == "magnitude"
    # auto, the default, is wanda: calibration data is always at hand in the steps
    auto = calibrate(Sources(model="demo:digits-cnn"), tmp_path / "auto", samples=32, batch_size=32)
    assert auto.info["score"] == "wanda" and auto.input_norms is not None
    with pytest.raises(UserError, match="rerun calibrate with --score wanda"):
        allocate(cal.path, tmp_path / "out", target=0.5, method="uniform", score="wanda")


def test_evaluate_and_register(digits_sparse, tmp_path):
    ev = evaluate(
        Sources(model="demo:digits-cnn"),
        digits_sparse.path,
        tmp_path / "eval",
        samples=128,
        tolerance=0.05,
        latency_seconds=0.05,
    )
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m == json.loads(json.dumps(ev.metrics))
    assert m["metric"] == "top1" and m["higher_is_better"]
    assert 0.9 < m["dense"] <= 1.0 and 0.0 <= m["sparse"] <= 1.0
    assert m["achieved_sparsity"] == digits_sparse.manifest["achieved_sparsity"]
    assert m["zeros"] == digits_sparse.manifest["zeros"] and m["counts_match_manifest"]
    assert [layer["zeros"] for layer in m["layers"]] == [
        layer["zeros"] for layer in digits_sparse.manifest["layers"]
    ]
    assert m["evaluation"]["samples"] == 128 and m["evaluation"]["overlap_with_calibration"] == 0
    # the size of the file allocate wrote (dense weights with zeros: about the dense size)
    written = Path(digits_sparse.path) / m["size"]["file"]
    assert m["size"]["sparse_bytes"] == written.stat().st_size > 0
    assert m["latency"]["dense_ms"] > 0 and m["latency"]["sparse_ms"] > 0
    assert (tmp_path / "eval" / "allocation.png").read_bytes().startswith(PNG_SIGNATURE)
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "allocation.png" in md and "features.0" in md and "top1" in md
    html = (tmp_path / "eval" / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert isinstance(m["gate"]["approved"], bool)

    calls = []

    def registry(request):
        calls.append(request)
        return {"version": 7}

    reg = register(
        tmp_path / "eval", digits_sparse.path, tmp_path / "reg", tolerance=1.0, registry=registry
    )
    record = json.loads((tmp_path / "reg" / "decision.json").read_text())
    assert reg.decision.approved and record["approved"]
    assert record["registration"] == {"status": "registered", "version": 7}
    assert len(calls) == 1 and calls[0].manifest["zeros"] == m["zeros"]

    def broken(request):
        raise ConnectionError("registry down")

    with pytest.raises(ServiceError, match="registry down"):
        register(
            tmp_path / "eval", digits_sparse.path, tmp_path / "reg2", tolerance=1.0, registry=broken
        )
    assert (
        json.loads((tmp_path / "reg2" / "decision.json").read_text())["registration"]["status"]
        == "failed"
    )

    calls.clear()
    worse = dict(m, sparse=m["dense"] - 0.5, drop=0.5)  # far outside any tolerance
    rejected = register(
        worse, digits_sparse.path, tmp_path / "reg3", tolerance=0.1, registry=registry
    )
    assert not rejected.decision.approved and "> tolerance" in rejected.decision.reasons[0]
    assert (
        len(calls) == 1 and calls[0].decision is rejected.decision
    )  # told, to record the rejection
    record = json.loads((tmp_path / "reg3" / "decision.json").read_text())
    assert record["approved"] is False
    assert record["registration"]["status"] == "rejection recorded by the registry"
    nothing = register(m, digits_sparse.path, tmp_path / "reg4", tolerance=1.0)
    assert "no registry configured" in nothing.record["registration"]["status"]


def _metrics(**kw):
    base = {
        "metric": "top1",
        "higher_is_better": True,
        "dense": 0.95,
        "sparse": 0.94,
        "achieved_sparsity": 0.5,
        "zeros": 50,
        "prunable": 100,
        "sparse_model": {"model_sha256": "abc"},
    }
    return {**base, **kw}


def test_gate_is_pure_and_explains_itself():
    manifest = {"target": 0.5, "model_sha256": "abc"}
    ok = gate(_metrics(), manifest, 0.02)
    assert ok == Decision(True, ok.reasons) and len(ok.reasons) == 3
    assert "drop 0.0100 <= tolerance 0.02" in ok.reasons[0]

    worse = gate(_metrics(sparse=0.90), manifest, 0.02)
    assert not worse.approved and "> tolerance" in worse.reasons[0]

    off_target = gate(_metrics(zeros=49, achieved_sparsity=0.49), manifest, 0.02)
    assert not off_target.approved and "not the 50" in off_target.reasons[1]

    other_model = gate(_metrics(sparse_model={"model_sha256": "zzz"}), manifest, 0.02)
    assert not other_model.approved and "different sparse model" in other_model.reasons[2]

    mse = _metrics(metric="relative_mse", higher_is_better=False, dense=0.0, sparse=0.03)
    assert gate(mse, manifest, 0.05).approved and not gate(mse, manifest, 0.01).approved
    assert not gate(_metrics(sparse=float("nan")), manifest, 0.02).approved

    with pytest.raises(UserError, match="tolerance"):
        gate(_metrics(), manifest, -1)
    with pytest.raises(UserError, match="no 'dense'"):
        gate({"metric": "top1", "sparse": 1.0}, manifest, 0.1)


def test_user_splits_are_disjoint_and_seeded():
    for total in (9, 10, 300):
        cal, val, ev = (
            set(split_indices(total, s, seed=3))
            for s in ("calibration", "validation", "evaluation")
        )
        assert not cal & ev and not cal & val and not val & ev
        assert cal | val | ev == set(range(total))
    assert split_indices(300, "calibration", 1) == split_indices(300, "calibration", 1)
    assert split_indices(300, "calibration", 1) != split_indices(300, "calibration", 2)


def test_demo_splits_are_disjoint():
    model = resolve_model("demo:digits-cnn")
    data = resolve_data(Sources(model="demo:digits-cnn"), model)
    cal = sample_digests(data.split("calibration", 300, 64))
    ev = sample_digests(data.split("evaluation", 300, 64))
    assert len(set(cal)) == 300 and len(set(ev)) == 300 and not set(cal) & set(ev)


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """The digits demo as user files: weights (safetensors and .pt), tensors, images, TorchScript."""
    from PIL import Image

    from fcpts.demos.digits import data, trained_model

    root = tmp_path_factory.mktemp("digits-files")
    model = trained_model()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(root / "weights.safetensors"))
    torch.save(state, root / "weights.pt")
    x, y = data()
    x, y = x[:240], y[:240]
    np.savez(root / "digits.npz", x=x.numpy(), y=y.numpy())
    np.save(root / "digits_x.npy", x.numpy())
    save_file({"x": x.contiguous(), "y": y}, str(root / "digits.safetensors"))
    torch.save({"x": x, "y": y}, root / "digits.pt")
    images = root / "images"
    for i in range(60):
        folder = images / f"class_{int(y[i])}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8), mode="L").save(
            folder / f"{i}.png"
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        torch.jit.script(model).save(str(root / "digits.ts"))
    return root


BUILDER = "fcpts.demos.digits:DigitsCNN"


@pytest.mark.parametrize(
    "data_file", ["digits.npz", "digits.safetensors", "digits.pt", "digits_x.npy"]
)
def test_module_function_with_weights_and_tensor_data(digits_files, tmp_path, data_file):
    weights = "weights.safetensors" if data_file != "digits.pt" else "weights.pt"
    sources = Sources(
        model=BUILDER, weights=str(digits_files / weights), data=str(digits_files / data_file)
    )
    cal = calibrate(sources, tmp_path / "cal", samples=40, batch_size=20)
    # unlabelled x for a CNN with (batch, 10) logits: still a classifier (agreement with dense)
    assert cal.info["task"] == "classifier" and cal.info["samples"] == 40
    assert cal.info["data"]["samples"] == 240 and cal.info["data"]["sha256"]
    allocate(cal.path, tmp_path / "sparse", target=0.5, method="erk")
    ev = evaluate(sources, tmp_path / "sparse", tmp_path / "eval", samples=80, latency_seconds=0.01)
    m = ev.metrics
    assert m["metric"] == "top1"
    assert ("agreement" in m["metric_description"]) == (data_file == "digits_x.npy")
    assert m["evaluation"]["samples"] == 80 and m["evaluation"]["same_data_as_calibration"]
    assert m["evaluation"]["overlap_with_calibration"] == 0


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_image_folder_and_torchscript(digits_files, tmp_path):
    sources = Sources(
        model=BUILDER,
        weights=str(digits_files / "weights.safetensors"),
        data=str(digits_files / "images"),
        image_mode="L",
    )
    cal = calibrate(sources, tmp_path / "cal", samples=20, batch_size=10)
    assert cal.info["task"] == "classifier" and cal.info["data"]["kind"] == "images"
    assert cal.batches[0]["x"].shape == (10, 1, 8, 8)
    # RGB images do not fit a 1-channel model: a clear error, not a traceback
    with pytest.raises(UserError, match="does not fit the model"):
        calibrate(
            Sources(model=BUILDER, data=str(digits_files / "images")), tmp_path / "bad", samples=8
        )

    scripted = Sources(model=str(digits_files / "digits.ts"), data=str(digits_files / "digits.npz"))
    cal = calibrate(scripted, tmp_path / "ts-cal", samples=20)
    out = allocate(cal.path, tmp_path / "ts-sparse", target=0.6, method="global")
    assert out.manifest["exact"] and len(out.manifest["layers"]) == 5
    assert _saved_zeros(tmp_path / "ts-sparse", out.manifest) == {
        layer["name"]: layer["zeros"] for layer in out.manifest["layers"]
    }
    ev = evaluate(
        scripted, tmp_path / "ts-sparse", tmp_path / "ts-eval", samples=40, latency_seconds=0.01
    )
    assert ev.metrics["zeros"] == out.manifest["zeros"]
    with pytest.raises(UserError, match="TorchScript"):
        allocate(cal.path, tmp_path / "ts-fcpts", target=0.6, method="fcpts")


@pytest.mark.parametrize(
    "model, weights, match",
    [
        ("demo:nothing", None, "unknown demo"),
        ("banana", None, "unknown model source"),
        ("no/such/model.pt", None, "does not exist"),
        ("no_such_module_xyz:build", None, "cannot be imported"),
        (BUILDER, "missing.safetensors", "does not exist"),
    ],
)
def test_bad_model_sources(model, weights, match):
    with pytest.raises(UserError, match=match):
        resolve_model(model, weights)


def test_bad_weights_and_data(digits_files, tmp_path):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a readable safetensors"):
        resolve_model(BUILDER, str(corrupt))
    pickled = tmp_path / "pickled.pt"
    torch.save(
        {"model": torch.nn.Linear(2, 2)}, pickled
    )  # a whole module: refused, never unpickled
    with pytest.raises(UserError, match="weights-only"):
        resolve_model(BUILDER, str(pickled))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"x": torch.zeros(3, 3)}, str(wrong))
    with pytest.raises(UserError, match="do not fit"):
        resolve_model(BUILDER, str(wrong))
    bad_shape = tmp_path / "bad.npy"
    np.save(bad_shape, np.zeros((30, 3, 32, 32), dtype=np.float32))
    with pytest.raises(UserError, match="does not fit the model"):
        calibrate(Sources(model="demo:digits-cnn", data=str(bad_shape)), tmp_path / "c", samples=4)
    nox = tmp_path / "nox.safetensors"
    save_file({"z": torch.zeros(2)}, str(nox))
    with pytest.raises(UserError, match="has no tensor 'x'"):
        resolve_data(
            Sources(model="demo:digits-cnn", data=str(nox)), resolve_model("demo:digits-cnn")
        )
    text = tmp_path / "lines.txt"
    text.write_text("a sentence\n")
    with pytest.raises(UserError, match="needs a model with a tokenizer"):
        calibrate(Sources(model="demo:digits-cnn", data=str(text)), tmp_path / "t")


def test_sparse_format_file(digits_sparse, tmp_path):
    state = load_file(str(digits_sparse.path / "model.safetensors"))
    params = [f"{layer['name']}.weight" for layer in digits_sparse.manifest["layers"]]
    size = sparse_format.save_packed(state, params, tmp_path / "packed.safetensors")
    assert size < (digits_sparse.path / "model.safetensors").stat().st_size
    tensors, _ = sparse_format.pack(state, params)
    assert tensors["classifier.1.weight::mask"].dtype == torch.uint8
    assert tensors["classifier.1.weight::values"].numel() == int(
        (state["classifier.1.weight"] != 0).sum()
    )
    back = sparse_format.unpack(tmp_path / "packed.safetensors")
    assert set(back) == set(state)
    for name, value in state.items():
        assert torch.equal(back[name], value), name


@pytest.mark.slow
def test_huggingface_folder_with_a_text_file(tmp_path):
    """MiniLM as a plain Hugging Face folder (not the demo) with the user's sentences."""
    from fcpts.demos import text
    from fcpts.demos.minilm import model_dir

    lines = text.sentences()[:90]
    data = tmp_path / "sentences.txt"
    data.write_text("\n".join(lines) + "\n")
    sources = Sources(model=str(model_dir()), data=str(data))
    model = resolve_model(sources.model)
    assert model.kind == "huggingface" and model.selection.exclude == ("pooler.*",)
    cal = calibrate(
        sources, tmp_path / "cal", samples=16, batch_size=8, score="wanda", resolved=model
    )
    assert cal.info["task"] == "encoder" and cal.info["batches"] == 2
    assert "pooler.dense" not in cal.input_norms
    out = allocate(
        cal, tmp_path / "sparse", target=0.5, method="fcpts", settings={"iters": 2}, resolved=model
    )
    assert out.manifest["exact"]
    ev = evaluate(
        sources,
        tmp_path / "sparse",
        tmp_path / "eval",
        samples=30,
        latency_seconds=0.01,
        resolved=model,
    )
    m = ev.metrics
    assert m["metric"] == "cosine" and 0.0 < m["sparse"] <= 1.0 and "nn_agreement" in m["secondary"]
    assert m["evaluation"]["samples"] == 30 and m["evaluation"]["overlap_with_calibration"] == 0
    assert m["counts_match_manifest"]
