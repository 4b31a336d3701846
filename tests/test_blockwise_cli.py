"""`fcpts allocate --blockwise`: the block-wise path through the allocate step (a tiny
Llama built from a config here): exact, loadable, evaluated and tracked like any other
allocation; the options it cannot run refused with a message; the auto decision."""

import json
import math

import mlflow
import pytest
from conftest import run_fcpts
from tiny_decoders import build, cli_allocate, cli_evaluate
from torch import nn

from fcpts.core import LayerSelection
from fcpts.errors import UserError
from fcpts.sources import ResolvedModel, resolve_model
from fcpts.steps import blockwise as bw

TIMEOUT_S = 600  # a hang guard on a shared 2-core machine, not a speed check


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("bwcli")
    folder = build("llama", root / "llama", layers=2)
    return folder, root / "llama.txt"


def _allocate(folder, text, out, *extra):
    return run_fcpts(*cli_allocate(folder, text, out, "--iters", "3", *extra), timeout=TIMEOUT_S)


def test_cli_blockwise_is_exact_loadable_evaluated_and_tracked(llama, tmp_path):
    folder, text = llama
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracked = ("--tracking-uri", uri, "--pipeline-run-id", "bw1")
    r = _allocate(folder, text, tmp_path / "sparse", "--blockwise", "on", *tracked)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "sparse" / "manifest.json").read_text())
    assert manifest["blockwise"] == "on" and manifest["method"] == "fcpts"
    assert manifest["exact"] and manifest["zeros"] == math.floor(0.5 * manifest["prunable"] + 0.5)
    assert [b["block"] for b in manifest["blockwise_run"]["blocks"]] == [0, 1]
    assert manifest["onnx"]["file"] == "model.onnx"
    assert not (tmp_path / "sparse.checkpoint").exists()  # the work folder is gone

    from transformers import AutoModelForCausalLM

    params = dict(AutoModelForCausalLM.from_pretrained(str(tmp_path / "sparse")).named_parameters())
    for layer in manifest["layers"]:
        assert int((params[layer["name"] + ".weight"] == 0).sum()) == layer["zeros"]

    sparse, evaluation = tmp_path / "sparse", tmp_path / "eval"
    r = run_fcpts(*cli_evaluate(folder, text, sparse, evaluation, *tracked), timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["metric"] == "perplexity" and metrics["exact"]
    runs = mlflow.MlflowClient(tracking_uri=uri).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(tracking_uri=uri).search_experiments()],
        "tags.`fcpts.pipeline_run_id` = 'bw1'",
    )
    assert [run.data.params["blockwise"] for run in runs] == ["on"]


def test_cli_blockwise_refuses_a_structure_without_a_traceback(llama, tmp_path):
    folder, text = llama
    r = _allocate(folder, text, tmp_path / "x", "--blockwise", "on", "--structure", "2:4")
    assert r.returncode != 0
    assert "--blockwise on: it prunes single weights only, not --structure 2:4" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "x").exists()


def test_what_blockwise_cannot_run(llama):
    folder, _ = llama
    model = resolve_model(str(folder))
    ok = dict(method="fcpts", structure="unstructured", save="dense", score="wanda")
    assert bw.problem(model, selection=model.selection, **ok) is None
    cases = [
        ({"method": "owl"}, "--method owl"),
        ({"structure": "2:4"}, "--structure 2:4"),
        ({"save": "compressed"}, "--save compressed"),
        ({"score": "magnitude"}, "--score wanda"),
    ]
    for change, says in cases:
        assert says in bw.problem(model, selection=model.selection, **dict(ok, **change))
    narrower = LayerSelection(exclude=("lm_head", "*.mlp.*"))
    assert "--exclude" in bw.problem(model, selection=narrower, **ok)
    encoder = ResolvedModel(source="pkg:net", kind="module", model=nn.Linear(2, 2))
    assert "decoder" in bw.problem(encoder, selection=LayerSelection(), **ok)
    with pytest.raises(UserError, match="drop joint"):
        bw.config({"iters": 3, "joint": True}, 64)
    assert bw.config({"iters": 3, "seed": 1}, 64).iters == 3


def test_auto_goes_blockwise_only_where_whole_model_learning_would_not_fit():
    size = 4 * 10_000_000  # 40 MB of fp32 weights: about 200 MB to learn whole
    assert bw.chosen("auto", problem=None, weight_bytes=size, memory_mb=64)
    assert not bw.chosen("auto", problem=None, weight_bytes=size, memory_mb=1024)
    assert not bw.chosen("auto", problem="not a decoder", weight_bytes=size, memory_mb=1)
    assert not bw.chosen("off", problem=None, weight_bytes=size, memory_mb=1)
    assert bw.chosen("on", problem=None, weight_bytes=1, memory_mb=1 << 20)
    with pytest.raises(UserError, match="--blockwise on: not a decoder; or use --blockwise off"):
        bw.chosen("on", problem="not a decoder", weight_bytes=size, memory_mb=1024)
    with pytest.raises(UserError, match="off, on or auto"):
        bw.chosen("sometimes", problem=None, weight_bytes=size, memory_mb=1024)
    assert bw.weight_bytes(nn.Linear(3, 2)) == 4 * 8
