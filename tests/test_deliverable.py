"""The allocate output folder is what users' tools load: a sentence-transformers source
gives a folder that transformers, sentence-transformers and onnxruntime load without
fcpts (and that matches fcpts's sparse model); a module source gives its state_dict and
model.onnx; a TorchScript source a TorchScript file; ``--save compressed`` a bitmask+values
file that loads back bit-exactly and is the size every report shows."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from fcpts.demos import text
from fcpts.demos.minilm import model_dir, tokenize
from fcpts.errors import UserError
from fcpts.export.onnx import run_onnx
from fcpts.sources import resolve_model
from fcpts.sparse_model import load_sparse, load_state
from fcpts.steps import Sources, allocate, calibrate, evaluate
from fcpts.tasks import EncoderTask

SENTENCES = ["a short sentence", "another sentence, about folders and the tools that load them"]

NO_FCPTS = r"""
import json, sys
sys.modules["fcpts"] = None  # the folder must load without fcpts
import numpy as np, onnxruntime as ort, torch
from sentence_transformers import SentenceTransformer
from transformers import AutoModel, AutoTokenizer
folder, sentences = sys.argv[1], json.loads(sys.argv[2])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModel.from_pretrained(folder).eval()
enc = tok(sentences, padding=True, return_tensors="pt")
with torch.no_grad():
    hidden = model(**enc).last_hidden_state
session = ort.InferenceSession(folder + "/model.onnx", providers=["CPUExecutionProvider"])
names = [i.name for i in session.get_inputs()]
onnx_out = session.run(None, {n: enc[n].numpy() for n in names})[0]
st = SentenceTransformer(folder, device="cpu").encode(sentences)
print(json.dumps({"class": type(model).__name__, "inputs": names,
                  "onnx_vs_torch": float(np.abs(onnx_out - hidden.numpy()).max()),
                  "st": st.tolist()}))
"""


def _st_folder(root):
    """A tiny random BERT (hidden 32, 2 layers) with MiniLM's tokenizer, laid out as a
    sentence-transformers model (mean pooling, normalize)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).eval().save_pretrained(root)
    AutoTokenizer.from_pretrained(str(model_dir())).save_pretrained(root)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (root / "modules.json").write_text(json.dumps(modules))
    (root / "sentence_bert_config.json").write_text('{"max_seq_length": 64}')
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    return root


@pytest.fixture(scope="module")
def st_sparse(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deliverable")
    source = _st_folder(tmp / "tiny-st")
    data = tmp / "sentences.txt"
    data.write_text("\n".join(text.sentences()[:200]) + "\n")
    sources = Sources(model=str(source), data=str(data))
    cal = calibrate(sources, tmp / "cal", score="magnitude", samples=32, batch_size=16)
    sparse = allocate(cal.path, tmp / "sparse", target=0.5, method="global")
    return sources, sparse


def test_sentence_transformers_folder_loads_without_fcpts(st_sparse):
    sources, sparse = st_sparse
    folder = sparse.path
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "1_Pooling/config.json",
        "model.onnx",
        "manifest.json",
    ):
        path = folder / name
        assert path.is_file(), name
        assert stat.S_IMODE(path.stat().st_mode) & 0o044 == 0o044, f"{name} not group readable"
    m = sparse.manifest
    assert m["model_file"] == "model.safetensors" and m["source_format"] == "huggingface"
    assert m["onnx"]["file"] == "model.onnx" and m["files"]["model.onnx"] > 0
    proc = subprocess.run(
        [sys.executable, "-c", NO_FCPTS, str(folder), json.dumps(SENTENCES)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["class"] == "BertModel"
    assert found["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert found["onnx_vs_torch"] < 1e-4
    # what sentence-transformers computes from the folder is fcpts's sparse model
    resolved = resolve_model(sources.model)
    net, _ = load_sparse(resolved.model, folder)
    (batch,) = tokenize(resolved.tokenizer, SENTENCES, len(SENTENCES))
    with torch.no_grad():
        expected = EncoderTask().output(net(**batch), batch).numpy()
    np.testing.assert_allclose(np.asarray(found["st"]), expected, atol=1e-5)
    zeros = sum(int((net.get_submodule(la["name"]).weight == 0).sum()) for la in m["layers"])
    assert zeros == m["zeros"]


def test_module_source_state_dict_and_onnx(digits_sparse):
    folder = digits_sparse.path
    m = digits_sparse.manifest
    assert (m["model_file"], m["source_format"]) == ("model.safetensors", "module")
    assert m["onnx"]["file"] == "model.onnx"
    from fcpts.demos import load_demo

    demo = load_demo("demo:digits-cnn")
    net, _ = load_sparse(demo.model, folder)
    x = demo.split("evaluation", 20, 20)[0]["x"]
    with torch.no_grad():
        want = net(x).numpy()
    assert np.abs(run_onnx(folder / "model.onnx", {"x": x}) - want).max() < 1e-4


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_source_gives_torchscript(tmp_path):
    from fcpts.demos.digits import data, trained_model

    model = trained_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(model).save(str(tmp_path / "digits.ts"))
    x, y = data()
    np.savez(tmp_path / "digits.npz", x=x[:120].numpy(), y=y[:120].numpy())
    sources = Sources(model=str(tmp_path / "digits.ts"), data=str(tmp_path / "digits.npz"))
    cal = calibrate(sources, tmp_path / "cal", samples=20)
    out = allocate(cal.path, tmp_path / "sparse", target=0.6, method="global")
    m = out.manifest
    assert m["model_file"] == "model.pt" and m["model_format"] == "torchscript"
    scripted = torch.jit.load(str(tmp_path / "sparse" / "model.pt"))
    state, _ = load_state(tmp_path / "sparse")
    assert all(torch.equal(v, state[k]) for k, v in scripted.state_dict().items())
    zeros = sum(int((state[f"{la['name']}.weight"] == 0).sum()) for la in m["layers"])
    assert zeros == m["zeros"]
    # torch's exporter does not take a ScriptModule: no ONNX, the reason in the manifest
    assert m["onnx"]["file"] is None and m["onnx"]["reason"], m["onnx"]
    assert not (tmp_path / "sparse" / "model.onnx").exists()


def test_compressed_loads_back_bit_exactly_and_is_the_reported_size(digits_calibration, tmp_path):
    allocate(digits_calibration.path, tmp_path / "d", target=0.7, method="global")
    packed = allocate(
        digits_calibration.path, tmp_path / "c", target=0.7, method="global", save="compressed"
    )
    m = packed.manifest
    assert m["model_file"] == "model.compressed.safetensors"
    assert not (tmp_path / "c" / "model.safetensors").exists()
    assert m["onnx"]["file"] is None and "compressed" in m["onnx"]["reason"]
    a, _ = load_state(tmp_path / "d")
    b, _ = load_state(tmp_path / "c")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    written = (tmp_path / "c" / m["model_file"]).stat().st_size
    assert written < (tmp_path / "d" / "model.safetensors").stat().st_size
    with pytest.raises(UserError, match="dense or compressed"):
        allocate(digits_calibration.path, tmp_path / "x", target=0.7, save="zip")
    for folder, model_file in (("c", m["model_file"]), ("d", "model.safetensors")):
        ev = evaluate(
            Sources(model="demo:digits-cnn"),
            tmp_path / folder,
            tmp_path / f"e{folder}",
            samples=32,
            latency_seconds=0.01,
        )
        # the reported size is the size of the file allocate wrote
        assert ev.metrics["size"]["sparse_bytes"] == (tmp_path / folder / model_file).stat().st_size
        assert ev.metrics["zeros"] == m["zeros"]


def test_causal_lm_folder_loads_with_its_own_class(tmp_path):
    """A decoder with tied embeddings: ``save_pretrained`` leaves the tied output weight out;
    AutoModelForCausalLM loads the folder as the source's class and fcpts loads it back."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    from fcpts.sparse_model import save_sparse

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[:, ::2] = 0
    ids = torch.randint(0, 64, (2, 8))
    save_sparse(model, {"target": 0.5}, tmp_path, example=((), {"input_ids": ids}))
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["model_file"] == "model.safetensors" and "onnx" in m
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(loaded).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-6)
    back, _ = load_sparse(GPT2LMHeadModel(config).eval(), tmp_path)
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
