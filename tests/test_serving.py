"""The registered model serves: demo:minilm through the steps with tracking (calibrate ->
allocate -> evaluate -> register, champion set), then a real ``mlflow models serve`` of
``models:/NAME@champion`` answers a POST of sentences with the sparse model's embeddings."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from services import HANG_GUARD_S, HOST, free_port  # noqa: E402

from fcpts.demos.minilm import tokenize  # noqa: E402
from fcpts.sources import resolve_model  # noqa: E402
from fcpts.sparse_model import load_sparse  # noqa: E402
from fcpts.steps import Sources, Tracking, allocate, calibrate, evaluate, register  # noqa: E402
from fcpts.tasks import EncoderTask  # noqa: E402

SENTENCES = ["a sentence about the weather", "another one, on trains and timetables"]


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    """demo:minilm at 0.5 (global magnitude: fast), registered as champion."""
    tmp = tmp_path_factory.mktemp("serving")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    name = f"minilm-serve-{uuid.uuid4().hex[:8]}"
    sources = Sources(model="demo:minilm")
    resolved = resolve_model("demo:minilm")
    cal = calibrate(
        sources,
        tmp / "cal",
        score="magnitude",
        samples=32,
        batch_size=16,
        resolved=resolved,
        tracking=Tracking(uri, experiment="serving"),
    )
    sparse = allocate(
        cal.path,
        tmp / "sparse",
        target=0.5,
        method="global",
        resolved=resolved,
        tracking=Tracking(uri),
    )
    ev = evaluate(
        sources,
        sparse.path,
        tmp / "eval",
        samples=32,
        tolerance=1.0,
        latency_seconds=0.01,
        resolved=resolved,
        tracking=Tracking(uri),
    )
    reg = register(
        ev.path, sparse.path, tmp / "reg", tolerance=1.0, name=name, tracking=Tracking(uri)
    )
    assert reg.record["registration"]["status"] == "registered"
    net, _ = load_sparse(resolved.model, sparse.path)
    (batch,) = tokenize(resolved.tokenizer, SENTENCES, len(SENTENCES))
    with torch.no_grad():
        expected = EncoderTask().output(net.eval()(**batch), batch).numpy()
    return {"uri": uri, "name": name, "tmp": tmp, "expected": expected, "folder": sparse.path}


def test_pyfunc_predicts_sentences(champion):
    """The champion loads as a pyfunc without fcpts's code, takes a list of sentences and
    returns the sparse model's embeddings; its requirements pin no fcpts; its serving
    example validates."""
    mlflow.set_tracking_uri(champion["uri"])
    model_uri = f"models:/{champion['name']}@champion"
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    out = pyfunc.predict(SENTENCES)
    assert out.shape == champion["expected"].shape == (2, 384) and out.dtype == np.float32
    np.testing.assert_allclose(out, champion["expected"], atol=1e-5)
    meta = pyfunc.metadata
    assert [c["type"] for c in meta.get_input_schema().to_dict()] == ["string"]
    assert meta.get_output_schema().inputs[0].shape == (-1, 384)
    local = mlflow.artifacts.download_artifacts(model_uri)
    requirements = open(os.path.join(local, "requirements.txt")).read()
    assert "fcpts" not in requirements
    for package in ("torch==", "transformers==", "sentence-transformers=="):
        assert package in requirements, requirements
    folder = os.path.join(local, "artifacts", "folder")
    for f in ("modules.json", "config.json", "model.safetensors", "model.onnx", "manifest.json"):
        assert os.path.isfile(os.path.join(folder, f)), f
    serving = mlflow.models.Model.load(local).get_serving_input(local)
    assert json.loads(serving)["inputs"]
    checked = mlflow.models.validate_serving_input(model_uri, serving)
    assert np.asarray(checked).shape[1] == 384


def _post(url: str, body: dict, deadline: float, proc) -> dict:
    data = json.dumps(body).encode()
    while True:
        request = urllib.request.Request(
            url, data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_mlflow_models_serve(champion):
    """``mlflow models serve -m models:/NAME@champion --env-manager local`` on loopback
    answers a POST of sentences with their embeddings."""
    port = free_port()
    log = open(champion["tmp"] / "serve.log", "w")
    env = dict(
        os.environ,
        MLFLOW_TRACKING_URI=champion["uri"],
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        # the server runs uvicorn from the environment's bin folder, as in an activated venv
        PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        f"models:/{champion['name']}@champion",
        "--env-manager",
        "local",
        "-h",
        HOST,
        "-p",
        str(port),
        "--workers",
        "1",
    ]
    proc = subprocess.Popen(
        ["setsid", *cmd],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=champion["tmp"],
    )
    try:
        reply = _post(
            f"http://{HOST}:{port}/invocations",
            {"inputs": SENTENCES},
            time.monotonic() + HANG_GUARD_S,
            proc,
        )
    except Exception:
        log.flush()
        print((champion["tmp"] / "serve.log").read_text()[-3000:])
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    got = np.asarray(reply["predictions"], dtype=np.float32)
    assert got.shape == (2, 384)
    np.testing.assert_allclose(got, champion["expected"], atol=1e-5)
