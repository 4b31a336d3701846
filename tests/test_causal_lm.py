"""Decoders through calibrate -> allocate -> evaluate: a tiny Llama and a tiny GPT-2
built from a config in the test (random weights: their perplexity is about the vocabulary
size, so only exactness, loadability and the metrics' consistency are checked)."""

import json
import math

import pytest
import torch
from conftest import run_fcpts
from safetensors.torch import load_file
from tiny_decoders import VOCAB, build, cli_allocate, cli_evaluate

from fcpts import lm_metrics
from fcpts.sources import Sources, resolve_data, resolve_model
from fcpts.sources.lm_text import token_blocks
from fcpts.sparse_model import load_sparse
from fcpts.steps import allocate, calibrate, evaluate
from fcpts.tasks import CausalLMTask


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def decoder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder = build(request.param, root / request.param)
    return request.param, folder, root / f"{request.param}.txt"


def test_decoder_calibrate_allocate_evaluate_is_exact_and_loadable(decoder, tmp_path):
    arch, folder, text = decoder
    src = Sources(model=str(folder), data=str(text))
    cal = calibrate(src, tmp_path / "cal", samples=16, batch_size=8, device="cpu")
    assert cal.info["task"] == "causal-lm" and cal.info["samples"] == 16
    assert cal.batches[0]["input_ids"].shape == (8, 128)
    assert "lm_head" not in cal.info["input_norm_layers"]  # the tied head stays dense
    allocate(cal.path, tmp_path / "sparse", target=0.6, settings={"iters": 8}, device="cpu")
    manifest = json.loads((tmp_path / "sparse" / "manifest.json").read_text())
    state = load_file(str(tmp_path / "sparse" / "model.safetensors"))
    zeros = sum(int((state[f"{m['name']}.weight"] == 0).sum()) for m in manifest["layers"])
    assert zeros == manifest["zeros"] == math.floor(0.6 * manifest["prunable"] + 0.5)

    ev = evaluate(
        src,
        tmp_path / "sparse",
        tmp_path / "eval",
        samples=16,
        batch_size=8,
        device="cpu",
        latency_seconds=0.05,
    )
    m = ev.metrics
    assert m["metric"] == "perplexity" and m["higher_is_better"] is False and m["exact"]
    assert m["evaluation"]["overlap_with_calibration"] == 0
    # random weights: the dense model is near-uniform over the vocabulary
    assert 0.5 * VOCAB < m["dense"] < 2 * VOCAB
    assert 0 < m["secondary"]["top1_agreement"]["sparse"] <= 1
    assert m["secondary"]["kl_to_dense"]["sparse"] > 0

    # the sparse model loads back as a Hugging Face decoder with every zero in place
    from transformers import AutoModelForCausalLM

    dense = resolve_model(str(folder))
    sparse_net, _ = load_sparse(dense.model, tmp_path / "sparse")
    sparse_net.save_pretrained(str(tmp_path / "hf"))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    got = dict(again.named_parameters())
    held = sum(int((got[f"{x['name']}.weight"] == 0).sum()) for x in manifest["layers"])
    assert held == manifest["zeros"]


def test_perplexity_and_agreement_are_the_textbook_figures():
    torch.manual_seed(0)
    tokens = torch.randint(0, 7, (2, 5))
    logits = torch.randn(2, 5, 7)
    logp = torch.log_softmax(logits, -1)
    nll = -sum(logp[b, i, tokens[b, i + 1]] for b in range(2) for i in range(4)) / 8
    assert lm_metrics.perplexity(logits, tokens) == pytest.approx(math.exp(float(nll)), rel=1e-5)
    q = lm_metrics.lm_quality(logits, logits, [{"input_ids": tokens}])
    assert q["secondary"]["top1_agreement"]["sparse"] == 1.0
    assert q["secondary"]["kl_to_dense"]["sparse"] == pytest.approx(0.0, abs=1e-6)
    other = logits.clone()
    other[0, 0] = -logits[0, 0]  # flips one of 8 scored predictions
    assert lm_metrics.lm_quality(logits, other, [{"input_ids": tokens}])["secondary"][
        "top1_agreement"
    ]["sparse"] == pytest.approx(7 / 8)
    # a padded last token is neither predicted nor predicting
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1, 4] = 0
    assert lm_metrics._scored(tokens, mask).sum() == 7


def test_text_is_cut_into_disjoint_whole_blocks(decoder):
    _, folder, text = decoder
    model = resolve_model(str(folder))
    data = resolve_data(Sources(model=str(folder), data=str(text)), model)
    assert data.kind == "lm-text"
    cal = data.split("calibration", 1000, 4)
    ev = data.split("evaluation", 1000, 4)
    rows = lambda bs: {tuple(r.tolist()) for b in bs for r in b["input_ids"]}  # noqa: E731
    assert not rows(cal) & rows(ev)
    assert token_blocks(torch.arange(10), 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    task = CausalLMTask()
    out = task.run(model.model, cal[0])
    assert task.output(out, cal[0]).shape == (4, 128, VOCAB)
    assert task.target(out, cal[0]).shape == (4 * 128, VOCAB)


def test_cli_runs_a_decoder(decoder, tmp_path):
    arch, folder, text = decoder
    if arch != "gpt2":
        pytest.skip("one architecture is enough for the CLI contract")
    r = run_fcpts(*cli_allocate(folder, text, tmp_path / "sparse", "--iters", "4"))
    assert r.returncode == 0, r.stderr
    assert "achieved 0.5" in r.stdout
    r = run_fcpts(*cli_evaluate(folder, text, tmp_path / "sparse", tmp_path / "eval"))
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and metrics["exact"]
