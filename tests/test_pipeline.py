"""The whole sparsify pipeline through KFP's real local runner (SubprocessRunner, no venv)."""

import json
from pathlib import Path

import pytest
from conftest import run_fcpts
from safetensors.torch import load_file

from fcpts.steps.calibrate import load_calibration

pytestmark = pytest.mark.slow


def _run_dir(root: Path) -> Path:
    (run,) = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("fcpts-sparsify-")]
    return run


def test_pipeline_approves_and_artifacts_agree(tmp_path):
    root = tmp_path / "runs"
    r = run_fcpts(
        "run",
        "--model",
        "demo:digits-cnn",
        "--target",
        "0.7",
        "--iters",
        "8",
        "--calibration-samples",
        "64",
        "--evaluation-samples",
        "100",
        "--tolerance",
        "0.5",
        "--latency-seconds",
        "0.05",
        "--root",
        root,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = _run_dir(root)

    # calibrate: the artifact folder and its description
    cal = load_calibration(run / "calibrate" / "calibration")
    assert cal.info["samples"] == 64 and cal.info["sources"]["model"] == "demo:digits-cnn"

    # allocate: the manifest's counts are the zeros in the saved weights
    sparse = run / "allocate" / "sparse_model"
    manifest = json.loads((sparse / "manifest.json").read_text())
    state = load_file(str(sparse / "model.safetensors"))
    saved = {
        layer["name"]: int((state[layer["name"] + ".weight"] == 0).sum())
        for layer in manifest["layers"]
    }
    assert saved == {layer["name"]: layer["zeros"] for layer in manifest["layers"]}
    assert sum(saved.values()) == manifest["zeros"] == round(0.7 * manifest["prunable"])
    assert manifest["method"] == "fcpts" and manifest["settings"]["iters"] == 8
    assert manifest["calibration"]["tensors_sha256"] == cal.info["tensors_sha256"]

    # evaluate: metrics agree with the manifest; the reports exist
    evaluation = run / "evaluate" / "evaluation"
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics == json.loads((run / "evaluate" / "metrics").read_text())
    assert metrics["zeros"] == manifest["zeros"] and metrics["counts_match_manifest"]
    assert metrics["sparse_model"]["model_sha256"] == manifest["model_sha256"]
    assert metrics["evaluation"]["overlap_with_calibration"] == 0
    assert (evaluation / "allocation.png").stat().st_size > 1000
    assert (run / "evaluate" / "report").read_text().startswith("# fcpts evaluation")
    assert "<img" in (run / "evaluate" / "report_html").read_text()
    assert metrics["gate"]["approved"] is True

    # register ran under dsl.If and recorded the decision
    decision = json.loads((run / "register" / "decision" / "decision.json").read_text())
    assert (
        decision["approved"] is True
        and decision["sparse_model"]["model_sha256"] == manifest["model_sha256"]
    )

    # the printed summary and the step times
    assert "target 0.7, achieved 0.69999" in r.stdout and "APPROVED" in r.stdout
    for step in ("calibrate", "allocate", "evaluate", "register", "total"):
        assert any(
            line.strip().startswith(step) and line.strip().endswith(" s")
            for line in r.stdout.splitlines()
        ), step
    assert (run / "pipeline.log").is_file()


def test_pipeline_rejection_skips_register(tmp_path):
    root = tmp_path / "runs"
    config = tmp_path / "run.yaml"  # options from a config file, one of them overridden by a flag
    config.write_text(
        "model: demo:digits-cnn\nmethod: uniform\ntarget: 0.5\ntolerance: 0\n"
        "calibration-samples: 32\nrun:\n  evaluation_samples: 100\n  latency_seconds: 0.01\n"
    )
    r = run_fcpts("run", "--config", config, "--target", "0.97", "--root", root)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = _run_dir(root)
    metrics = json.loads((run / "evaluate" / "evaluation" / "metrics.json").read_text())
    assert metrics["drop"] > 0 and metrics["gate"]["approved"] is False
    assert not (run / "register").exists()
    assert "REJECTED" in r.stdout and "skipped" in r.stdout
    manifest = json.loads((run / "allocate" / "sparse_model" / "manifest.json").read_text())
    assert manifest["target"] == 0.97 and manifest["method"] == "uniform"
    assert metrics["evaluation"]["samples"] == 100
