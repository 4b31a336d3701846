"""MLflow tracking of a pipeline run, against the embedded SQLite store, an MLflow server
on SQLite, and an MLflow server on PostgreSQL with artifacts in S3 (moto)."""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
import zlib
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from fcpts.core import sparsify  # noqa: E402
from fcpts.demos import load_demo  # noqa: E402
from fcpts.errors import ServiceError, UserError  # noqa: E402
from fcpts.sparse_model import apply_allocation, manifest, read_manifest, save_sparse  # noqa: E402
from fcpts.tracking import (  # noqa: E402
    PipelineRun,
    RetryPolicy,
    model_digest,
    pipeline_params,
    redact,
    resolve_tracking_uri,
)
from fcpts.tracking.connection import Store  # noqa: E402
from fcpts.tracking.names import EVALUATION_PARAM_NAMES, param_names  # noqa: E402

BACKENDS = ["embedded", "server-sqlite", "server-pg-s3"]
ITERS = 12


@pytest.fixture(scope="module")
def embedded_uri(tmp_path_factory):
    # one store for the session, shared with the other MLflow test module: creating a SQLite
    # store takes seconds; tests use their own experiments and model names in it
    folder = tmp_path_factory.getbasetemp() / "fcpts-embedded-mlflow"
    folder.mkdir(exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(params=BACKENDS)
def tracking_uri(request, embedded_uri):
    """The tracking URI of one of the three set-ups (servers start once per session)."""
    if request.param == "embedded":
        return embedded_uri
    if request.param == "server-sqlite":
        return request.getfixturevalue("mlflow_sqlite_server").tracking_uri
    return request.getfixturevalue("mlflow_pg_s3_server").tracking_uri


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """A real sparse digits CNN (fcpts allocator, 70%), saved like `fcpts allocate` does."""
    demo = load_demo("demo:digits-cnn")
    calib = demo.split("calibration", 64, 64)
    history = []
    alloc = sparsify(
        demo.model,
        0.7,
        method="fcpts",
        score="magnitude",
        task=demo.task,
        batches=calib,
        settings={"iters": ITERS},
        device="cpu",
        callback=lambda step, record: history.append((step, dict(record))),
    )
    model = apply_allocation(demo.model, alloc).eval()
    out = tmp_path_factory.mktemp("sparse")
    save_sparse(model, manifest(alloc), out)
    return SimpleNamespace(
        demo=demo,
        model=model,
        alloc=alloc,
        dir=out,
        calib=calib,
        eval=demo.split("evaluation", 128, 64),
        history=history,
    )


def _png(path: Path) -> Path:
    """A valid 1x1 PNG (the evaluate step's chart stands in here)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b"")
    path.write_bytes(raw)
    return path


def _artifacts(client, run_id, path=None) -> set[str]:
    found = set()
    for f in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return found


def test_pipeline_run_is_tracked(tracking_uri, sparse, tmp_path):
    """One pipeline through all four steps: params, metrics, curves, artifacts, datasets,
    tags and the model, read back with a plain MlflowClient."""
    experiment = f"test-tracking-{uuid.uuid4().hex[:8]}"
    pid = f"pipe-{uuid.uuid4().hex[:8]}"
    run = PipelineRun.open(pid, tracking_uri=tracking_uri, experiment=experiment)
    assert (
        PipelineRun.open(pid, tracking_uri=tracking_uri, experiment=experiment).run_id == run.run_id
    )

    sent = []
    original = run.log_batch

    def counting(what, **kw):
        if what == "log the allocator curves":
            sent.append(len(kw["metrics"]))
        return original(what, **kw)

    run.log_batch = counting

    with run.step("calibrate"):
        calib_digest = run.log_dataset(
            sparse.calib, context="calibration", source="demo:digits-cnn"
        )
    with run.step("allocate"):
        curves = run.curve_logger(every=5, seconds=60)
        for step, record in sparse.history:
            curves(step, record)
        curves.close()
        run.log_params(
            pipeline_params(
                read_manifest(sparse.dir),
                model_source="demo:digits-cnn",
                model_digest=model_digest(sparse.demo.model),
                calibration_samples=64,
            )
        )
        run.log_allocation(sparse.dir)
    # the curves went in ceil(12 / 5) = 3 batches, not one request per iteration (the
    # held-out checks add their keys to the records they happen at)
    keys = [len(set(record) - {"iteration"}) for _, record in sparse.history]
    assert len(keys) == 12 and sent == [sum(keys[i : i + 5]) for i in range(0, 12, 5)]
    with run.step("evaluate"):
        run.log_dataset(sparse.eval, context="evaluation", source="demo:digits-cnn")
        metrics_file = tmp_path / "metrics.json"
        metrics_file.write_text(
            json.dumps(
                {
                    "metric": "top1",
                    "dense": 0.97,
                    "sparse": 0.955,
                    "higher_is_better": True,
                    "achieved_sparsity": 0.7,
                    "exact": True,
                    "prunable": sparse.alloc.prunable,
                    "secondary": {"agreement_with_dense": {"dense": 1.0, "sparse": 0.8}},
                    "evaluation": {
                        "data": "demo:digits-cnn",
                        "samples": 128,
                        "seed": 3,
                        "overlap_with_calibration": 0,
                    },
                    "latency": {"threads": 2, "batch_size": 16, "dense_ms": 2.0, "sparse_ms": 1.0},
                    "size": {"dense_bytes": 1000, "sparse_compressed_bytes": 420},
                    "layers": [{"name": "features.0", "sparsity": 0.5}],
                }
            )
        )
        report = tmp_path / "report.md"
        report.write_text("# fcpts report\n")
        run.log_evaluation(metrics_file, chart=_png(tmp_path / "layers.png"), report=report)
    with run.step("register"):
        model_uri = run.log_model(sparse.model, sparse.eval[0], task=sparse.demo.task)
    run.finish()

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED"
    params = got.data.params
    assert set(param_names()) | set(EVALUATION_PARAM_NAMES) == set(params)
    assert (
        params["target"] == "0.7"
        and params["allocator"] == "fcpts"
        and params["score"] == "magnitude"
    )
    assert params["iters"] == str(ITERS) and params["calibration_samples"] == "64"
    assert params["lam"] != "n/a" and params["seed"] == "0"
    assert params["model_source"] == "demo:digits-cnn" and params["model_digest"].startswith(
        "sha256:"
    )
    assert params["metric"] == "top1" and params["evaluation_samples"] == "128"
    assert params["prunable"] == str(sparse.alloc.prunable)
    assert params["evaluation_seed"] == "3" and params["latency_threads"] == "2"
    assert params["eval_batch_size"] == "n/a"  # not in this metrics.json
    assert got.data.tags["fcpts.higher_is_better"] == "true"
    assert got.data.tags["fcpts.exact"] == "true"
    assert got.data.tags["fcpts.evaluation_overlap"] == "0"

    m = got.data.metrics
    assert m["evaluate/dense"] == 0.97 and m["evaluate/sparse"] == 0.955
    assert m["evaluate/delta"] == pytest.approx(-0.015)
    assert m["allocate/achieved_sparsity"] == pytest.approx(sparse.alloc.achieved)
    assert m["evaluate/size.sparse_compressed_bytes"] == 420
    assert m["evaluate/latency.speedup"] == pytest.approx(2.0)
    assert m["evaluate/agreement_with_dense"] == 0.8
    # constants of the run are params or tags, not metrics
    constants = ("exact", "prunable", "evaluation.", "latency.threads", "latency.batch", "layers")
    assert not [k for k in m if k.split("/", 1)[1].startswith(constants)], sorted(m)
    assert m["allocate/zeros"] == sparse.alloc.zeros and "evaluate/zeros" not in m
    for step in ("calibrate", "allocate", "evaluate", "register"):
        assert m[f"{step}/seconds"] >= 0
        assert got.data.tags[f"fcpts.step.{step}"] == "done"
    for key in ("loss", "global_sparsity"):
        hist = sorted(
            client.get_metric_history(run.run_id, f"allocate/{key}"), key=lambda p: p.step
        )
        assert [p.step for p in hist] == list(range(ITERS))
        assert [p.value for p in hist] == pytest.approx([r[key] for _, r in sparse.history])

    tags = got.data.tags
    assert tags["fcpts.pipeline_run_id"] == pid
    assert tags["fcpts.version"]
    if tags.get("fcpts.git_commit"):
        assert tags["mlflow.source.git.commit"] == tags["fcpts.git_commit"]
    assert tags["fcpts.calibration_digest"] == calib_digest

    assert {
        "allocation/manifest.json",
        "evaluation/metrics.json",
        "evaluation/report.md",
    } <= _artifacts(client, run.run_id)
    # at the root, the same paths on every run: what the compare view lines up
    root = {f.path for f in client.list_artifacts(run.run_id) if not f.is_dir}
    assert {"allocation.png", "layers.json"} <= root
    table = json.loads(
        Path(client.download_artifacts(run.run_id, "layers.json", str(tmp_path))).read_text()
    )
    assert table["columns"] == ["layer", "weights", "zeros", "sparsity"]
    layers = read_manifest(sparse.dir)["layers"]
    assert [row[0] for row in table["data"]] == [layer["name"] for layer in layers]
    assert [row[2] for row in table["data"]] == [layer["zeros"] for layer in layers]
    manifest_path = client.download_artifacts(run.run_id, "allocation/manifest.json", str(tmp_path))
    assert json.loads(Path(manifest_path).read_text())["achieved_sparsity"] == sparse.alloc.achieved

    inputs = {
        i.dataset.name: ({t.key: t.value for t in i.tags}, i.dataset.digest)
        for i in got.inputs.dataset_inputs
    }
    assert inputs["calibration"] == ({"mlflow.data.context": "calibration"}, calib_digest)
    assert inputs["evaluation"][0] == {"mlflow.data.context": "evaluation"}

    # the logged model gives the sparse model's outputs back
    assert model_uri == tags["fcpts.model_uri"]
    with Store(tracking_uri).fluent():
        loaded = mlflow.pytorch.load_model(model_uri)
    x = sparse.eval[1]["x"]  # not the batch the example came from; 64 rows, not 2
    with torch.no_grad():
        assert torch.allclose(loaded(x), sparse.model(x), atol=1e-6)


def test_failed_step_marks_run_failed(embedded_uri):
    run = PipelineRun.open(tracking_uri=embedded_uri, experiment="test-failed-step")
    with pytest.raises(RuntimeError, match="boom"), run.step("evaluate"):
        raise RuntimeError("boom")
    got = run.client.get_run(run.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["fcpts.failed_step"] == "evaluate"
    assert got.data.tags["fcpts.step.evaluate"] == "failed"
    assert "evaluate/seconds" in got.data.metrics
    # a retried step reopens the same run
    again = PipelineRun.open(
        run.pipeline_run_id, tracking_uri=embedded_uri, experiment="test-failed-step"
    )
    assert again.run_id == run.run_id
    assert again.client.get_run(run.run_id).info.status == "RUNNING"


def test_no_credentials_in_params_or_tags(embedded_uri, monkeypatch):
    monkeypatch.setenv("FCPTS_TEST_SECRET_TOKEN", "s3cr3t-value-42")
    run = PipelineRun.open(
        tracking_uri=embedded_uri,
        tags={"source": "postgresql://alice:hunter2@db.internal/models"},
    )
    run.log_params(
        {
            "model_source": "https://bob:pa55word@models.example/m.safetensors?X-Amz-Signature=abc123",
            "note": "token s3cr3t-value-42 inside",
        }
    )
    got = run.client.get_run(run.run_id)
    text = json.dumps([got.data.params, got.data.tags])
    for secret in ("hunter2", "pa55word", "abc123", "s3cr3t-value-42"):
        assert secret not in text
    assert got.data.params["model_source"].startswith("https://bob:***@models.example/")
    assert got.data.tags["source"] == "postgresql://alice:***@db.internal/models"


def test_redact():
    assert (
        redact("postgresql+psycopg2://fcpts@127.0.0.1:5432/db")
        == "postgresql+psycopg2://fcpts@127.0.0.1:5432/db"
    )
    assert redact("http://u:p@h:5000") == "http://u:***@h:5000"
    assert redact("https://ghp_0123456789abcdefghij@github.com/x") == "https://***@github.com/x"


def test_embedded_default_store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    assert resolve_tracking_uri(str(tmp_path / "x")) == f"sqlite:///{tmp_path / 'x' / 'mlflow.db'}"
    run = PipelineRun.open()
    report = tmp_path / "report.md"
    report.write_text("hi")
    run.log_artifact(report, "evaluation")
    assert (tmp_path / "mlruns" / "mlflow.db").is_file()
    assert list((tmp_path / "mlruns" / "artifacts").rglob("report.md"))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_names_uri_without_password(monkeypatch):
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(var, "restored-after-the-test")
    port = _free_port()
    uri = f"http://fcpts:hunter2@127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(ServiceError) as err:
        PipelineRun.open(tracking_uri=uri, retry=RetryPolicy(attempts=3, backoff=0.1))
    elapsed = time.monotonic() - start
    msg = str(err.value)
    assert f"store http://127.0.0.1:{port} did not answer" in msg
    assert "hunter2" not in msg
    assert "3 attempt(s)" in msg and "mlflow server" in msg
    assert 0.2 < elapsed < 60
    # the credentials went to the variables MLflow reads, not into the URI it was given
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "hunter2"


def test_bad_pipeline_run_id(embedded_uri):
    with pytest.raises(UserError, match="pipeline run id"):
        PipelineRun.open("bad id with spaces", tracking_uri=embedded_uri)


def test_run_named_by_model_method_and_target(embedded_uri, sparse):
    """A run that calibrate opened is named by the model; allocate's manifest renames it
    by model, method and target; the register step's default registered name has no
    target (every target competes in one registered model)."""
    from fcpts.steps.register import default_model_name
    from fcpts.steps.tracked import Tracking

    pid = f"20261201-213803-{uuid.uuid4().hex[:8]}"
    tail = pid.rsplit("-", 1)[1]
    tracking = Tracking(embedded_uri, "test-run-names", pid).resolve()
    calibrated = tracking.named({"sources": {"model": "demo:digits-cnn"}}).open(step="calibrate")
    assert (
        calibrated.client.get_run(calibrated.run_id).info.run_name == f"digits-cnn-calibrate-{tail}"
    )
    m = read_manifest(sparse.dir)
    m["sources"] = {"model": "demo:digits-cnn"}
    again = tracking.resolve(m).open(step="evaluate")
    assert again.run_id == calibrated.run_id
    assert again.client.get_run(again.run_id).info.run_name == f"digits-cnn-fcpts-0.7-{tail}"
    assert default_model_name("demo:minilm", "fcpts") == "minilm-fcpts"
    assert default_model_name("s3://bucket/models/bert/", "wanda") == "bert-wanda"
