"""The steps' outputs whole or absent, locally and in S3 (moto), and allocate's resume.

* calibrate -> allocate -> evaluate -> register with every input and output on s3://
* ``fcpts allocate --resume`` after a SIGKILL equals an uninterrupted run
* a failed step leaves an existing output folder as it was
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_fcpts
from safetensors.torch import load_file
from services import HANG_GUARD_S

from fcpts.checkpoint import FILE_NAME
from fcpts.steps import Sources, allocate, calibrate, evaluate, register
from fcpts.storage.outputs import INDEX_NAME, fetch_output, read_index

DIGITS = Sources(model="demo:digits-cnn")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_pipeline_by_steps_on_s3(aws_env, tmp_path):
    bucket = f"steps-{uuid.uuid4().hex[:8]}"
    aws_env.client().create_bucket(Bucket=bucket)
    base = f"s3://{bucket}/run"
    cal = calibrate(DIGITS, f"{base}/calibration/", score="wanda", samples=64, batch_size=32)
    sparse = allocate(f"{base}/calibration/", f"{base}/sparse", target=0.7, settings={"iters": 5})
    assert not any((tmp_path / "cache" / ".checkpoints").glob("*/" + FILE_NAME))
    result = evaluate(DIGITS, f"{base}/sparse", f"{base}/evaluation", latency_seconds=0.05)
    assert result.metrics["sparse_model"]["path"] == f"{base}/sparse"
    decision = register(f"{base}/evaluation", f"{base}/sparse", f"{base}/decision", tolerance=1.0)
    assert decision.record["sparse_model"]["path"] == f"{base}/sparse"

    # every output is complete in S3: its index lists each file with its sha256
    for name, files in (
        ("calibration", {"calibration.json", "calibration.safetensors"}),
        ("sparse", {"manifest.json", "model.safetensors", "model.onnx"}),
        ("evaluation", {"metrics.json", "report.md", "report.html", "allocation.png"}),
        ("decision", {"decision.json"}),
    ):
        assert set(read_index(f"{base}/{name}")["files"]) == files, name
    assert cal.info["tensors_sha256"] == _sha(cal.path / "calibration.safetensors")

    # the manifest read back from S3 alone (a fresh download, sha256 checked)
    fetched = fetch_output(f"{base}/sparse", tmp_path / "fetched")
    index = read_index(f"{base}/sparse")
    for rel, meta in index["files"].items():
        assert _sha(fetched / rel) == meta["sha256"]
    manifest = json.loads((fetched / "manifest.json").read_text())
    assert manifest == sparse.manifest
    assert manifest["model_sha256"] == _sha(fetched / "model.safetensors")
    assert not (fetched / INDEX_NAME).exists()

    # the CLI step reads and writes s3:// too
    env = {k: os.environ[k] for k in os.environ if k.startswith(("AWS_", "FCPTS_"))}
    cli = run_fcpts(
        "evaluate", "--model", "demo:digits-cnn", "--sparse", f"{base}/sparse", "--out",
        f"{base}/evaluation-cli", "--latency-seconds", "0.05", "--no-tracking", env=env,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert f"wrote {base}/evaluation-cli/metrics.json" in cli.stdout
    assert "metrics.json" in read_index(f"{base}/evaluation-cli")["files"]


def _allocate_cli(cal: Path, out: Path, *extra: str) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("fcpts")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fcpts.cli"]
    args = ["allocate", "--calibration", cal, "--out", out, "--target", "0.7", "--iters", "30"]
    args += ["--checkpoint-every", "5", "--seed", "3", "--no-tracking", *extra]
    return subprocess.Popen(
        cmd + [str(a) for a in args],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_allocate_resumes_after_sigkill(tmp_path):
    cal = calibrate(DIGITS, tmp_path / "cal", score="wanda", samples=64, batch_size=32).path
    reference = _allocate_cli(cal, tmp_path / "reference")
    killed = _allocate_cli(cal, tmp_path / "resumed")
    checkpoint = tmp_path / "resumed.checkpoint" / FILE_NAME
    deadline = time.monotonic() + HANG_GUARD_S
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    log = killed.communicate(timeout=HANG_GUARD_S)[0]
    assert killed.returncode == -signal.SIGKILL, log  # killed, not finished
    assert checkpoint.exists() and not (tmp_path / "resumed").exists()
    assert [p.name for p in tmp_path.glob(".resumed.fcpts-tmp-*")]  # the killed run's staging

    other = _allocate_cli(cal, tmp_path / "resumed", "--resume", "--lam", "2")
    log = other.communicate(timeout=HANG_GUARD_S)[0]
    assert other.returncode == 2 and "differing: settings" in log, log  # not its checkpoint
    resumed = _allocate_cli(cal, tmp_path / "resumed", "--resume")
    log = resumed.communicate(timeout=HANG_GUARD_S)[0]
    assert resumed.returncode == 0 and "resuming from the checkpoint" in log, log
    assert reference.communicate(timeout=HANG_GUARD_S)[0] and reference.returncode == 0
    want, got = (tmp_path / n / "model.safetensors" for n in ("reference", "resumed"))
    assert got.read_bytes() == want.read_bytes()
    a, b = load_file(str(want)), load_file(str(got))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert not (tmp_path / "resumed.checkpoint").exists()  # removed once the output is whole
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no litter


class Boom(Exception):
    pass


def test_failed_step_keeps_an_existing_output(tmp_path):
    cal = calibrate(DIGITS, tmp_path / "cal", score="wanda", samples=64, batch_size=32)
    out = tmp_path / "out"
    first = allocate(cal, out, target=0.5, method="uniform")
    (out / "notes.txt").write_text("the user's own file")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(iteration, record):
        if iteration == 3:
            raise Boom

    with pytest.raises(Boom):
        allocate(cal, out, target=0.7, settings={"iters": 10}, callback=fail)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(Exception, match="target"):
        allocate(cal, out, target=1.5, method="uniform")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal", "out"]  # nothing staged left

    # a successful rerun replaces the step's files, each whole, and keeps the user's
    second = allocate(cal, out, target=0.7, method="uniform")
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert second.manifest["target"] == 0.7 != first.manifest["target"]
    assert second.manifest["model_sha256"] == _sha(out / "model.safetensors")
