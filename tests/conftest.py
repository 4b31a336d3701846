import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))

import services  # noqa: E402  (tests/services.py: start/stop real services)


# The CLI tracks to MLflow by default (--tracking-uri, else $MLFLOW_TRACKING_URI, else
# ./mlruns): tests that do not choose a store get one of their own, not the checkout's.
@pytest.fixture(scope="session", autouse=True)
def _test_tracking_store(tmp_path_factory):
    if os.environ.get("MLFLOW_TRACKING_URI"):
        yield
        return
    folder = tmp_path_factory.mktemp("mlruns")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# --- real services ---
# Session-scoped: each service starts once, on a free 127.0.0.1 port, and is stopped at
# the end of the session. A missing binary skips the tests that need it, except under CI
# (CI set), where it fails them.


def _start(start, *args, **kwargs):
    try:
        return start(*args, **kwargs)
    except services.ServiceUnavailable as e:
        if os.environ.get("CI"):
            pytest.fail(f"{e} (CI is set: missing services fail instead of skipping)")
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL server; ``.url`` is the SQLAlchemy URL of its database ``fcpts``."""
    svc = _start(services.start_postgres, tmp_path_factory.mktemp("postgres"))
    with svc:
        yield svc


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory):
    """A moto S3 server; ``.endpoint_url``, ``.env()`` (AWS variables), ``.client()``."""
    svc = _start(services.start_moto, tmp_path_factory.mktemp("moto"))
    with svc:
        yield svc


@pytest.fixture(scope="session")
def mlflow_sqlite_server(tmp_path_factory):
    """An MLflow server on SQLite with local artifacts; ``.tracking_uri``."""
    d = tmp_path_factory.mktemp("mlflow-sqlite")
    svc = _start(services.start_mlflow_server, d, f"sqlite:///{d / 'mlflow.db'}")
    with svc:
        yield svc


@pytest.fixture
def aws_env(moto_server, monkeypatch, tmp_path):
    """The standard AWS environment pointing at the moto server (and nothing from ~/.aws or
    the caller's AWS variables), and a fresh fcpts cache; returns the moto server."""
    for var in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ENDPOINT_URL",
        "AWS_SESSION_TOKEN",
        "AWS_REGION",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for k, v in moto_server.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("FCPTS_CACHE", str(tmp_path / "cache"))
    return moto_server


MLFLOW_ARTIFACT_BUCKET = "fcpts-mlflow"


@pytest.fixture(scope="session")
def mlflow_pg_s3_server(tmp_path_factory, postgres, moto_server):
    """An MLflow server on PostgreSQL (its own database ``mlflow``) with artifacts in
    ``s3://fcpts-mlflow/artifacts`` on the moto server; ``.artifacts_destination``."""
    moto_server.client().create_bucket(Bucket=MLFLOW_ARTIFACT_BUCKET)
    svc = _start(
        services.start_mlflow_server,
        tmp_path_factory.mktemp("mlflow-pg"),
        postgres.create_database("mlflow"),
        f"s3://{MLFLOW_ARTIFACT_BUCKET}/artifacts",
        env=moto_server.env(),
    )
    with svc:
        yield svc


# --- pipeline fixtures ---
# Steps, CLI, components and the KFP pipeline (tests/test_steps.py, test_cli.py,
# test_pipeline.py, test_components.py). Small digits-CNN settings keep them fast.

import subprocess  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# As the fcpts CLI does: OpenMP threads sleep rather than spin while waiting. On this
# shared 2-core machine spinning threads of parallel processes slowed torch 3-5x. Set
# before any test module imports torch, so it applies to the whole session.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run_fcpts(*args, cwd=None, timeout=services.HANG_GUARD_S, env=None):
    """Run the installed ``fcpts`` CLI in a subprocess; returns the CompletedProcess
    (``timeout``: a hang guard, not a speed check)."""
    full_env = dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false"
    )
    full_env.update(env or {})
    exe = Path(sys.executable).with_name("fcpts")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "fcpts.cli"]
    return subprocess.run(
        cmd + [str(a) for a in args],
        cwd=cwd or REPO_ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def digits_calibration(tmp_path_factory):
    """A wanda-ready calibration artifact of demo:digits-cnn (96 samples, batches of 32)."""
    from fcpts.steps import Sources, calibrate

    out = tmp_path_factory.mktemp("digits-calibration")
    return calibrate(
        Sources(model="demo:digits-cnn"), out, score="wanda", samples=96, batch_size=32
    )


@pytest.fixture(scope="session")
def digits_sparse(tmp_path_factory, digits_calibration):
    """demo:digits-cnn allocated at 0.7 with a short fcpts run."""
    from fcpts.steps import allocate

    out = tmp_path_factory.mktemp("digits-sparse")
    return allocate(
        digits_calibration.path, out, target=0.7, method="fcpts", settings={"iters": 10}
    )
