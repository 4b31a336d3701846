"""`fcpts compile` writes both pipelines for a cluster: every step with a timeout and its
credentials from Kubernetes secrets, never from parameters or literal values."""

import pytest
import yaml

from fcpts.cli import main
from fcpts.errors import UserError
from fcpts.sweep import shared_storage

SPARSIFY_STEPS = ("calibrate", "allocate", "evaluate", "register")
SWEEP_STEPS = ("sweep-prepare", "sweep-worker", "sweep-best", *SPARSIFY_STEPS)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, monkeypatch_module):
    # credentials in the environment at compile time must not reach the YAML
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-aws-key")
    monkeypatch_module.setenv("FCPTS_OPTUNA_STORAGE", "postgresql+psycopg2://u:s3cr3t-db@db/x")
    out = tmp_path_factory.mktemp("compile")
    assert main(["compile", "--out", str(out / "sparsify.yaml")]) == 0
    texts = {
        "sparsify": (out / "sparsify.yaml").read_text(),
        "sweep": (out / "sweep_pipeline.yaml").read_text(),
    }
    return {name: (text, list(yaml.safe_load_all(text))) for name, text in texts.items()}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _platform(docs):
    (platform,) = [d for d in docs if "platforms" in d]
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


@pytest.mark.parametrize("pipeline,steps", [("sparsify", SPARSIFY_STEPS), ("sweep", SWEEP_STEPS)])
def test_every_step_has_secrets_and_a_timeout(compiled, pipeline, steps):
    text, docs = compiled[pipeline]
    executors = _platform(docs)
    for step in steps:
        config = executors[f"exec-{step}"]
        assert int(config["activeDeadlineSeconds"]) > 0, step
        secrets = {s["secretName"]: s for s in config["secretAsEnv"]}
        assert {"fcpts-s3", "fcpts-mlflow"} <= set(secrets), step
        keys = {k["secretKey"] for k in secrets["fcpts-s3"]["keyToEnv"]}
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL_S3"} <= keys
        assert all(s["optional"] for s in secrets.values())
        if step.startswith("sweep-"):
            assert "fcpts-optuna-db" in secrets
    assert "s3cr3t" not in text


def test_allocate_may_run_longest(compiled):
    executors = _platform(compiled["sparsify"][1])
    deadline = {s: int(executors[f"exec-{s}"]["activeDeadlineSeconds"]) for s in SPARSIFY_STEPS}
    assert deadline["allocate"] == max(deadline.values())


def test_no_credential_is_a_parameter(compiled):
    for _, docs in compiled.values():
        params = docs[0]["root"]["inputDefinitions"]["parameters"]
        for name in params:
            assert not any(w in name.lower() for w in ("password", "secret", "key", "token"))
    sweep_params = compiled["sweep"][1][0]["root"]["inputDefinitions"]["parameters"]
    assert sweep_params["storage"]["defaultValue"] == ""


def test_secret_names_follow_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FCPTS_K8S_S3_SECRET", "team-minio")
    monkeypatch.setenv("FCPTS_K8S_MLFLOW_SECRET", "")
    out = tmp_path / "p.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    executors = _platform(list(yaml.safe_load_all(out.read_text())))
    names = {s["secretName"] for s in executors["exec-allocate"]["secretAsEnv"]}
    assert names == {"team-minio"}


def test_compile_refuses_one_file_for_both(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--out", str(out), "--sweep-out", str(out)]) == 2
    assert "name the same file" in capsys.readouterr().err
    assert not out.exists()


def test_sweep_storage_from_the_secret_environment():
    url = "postgresql+psycopg2://u:pw@db.internal/sweeps"
    assert shared_storage("", {"FCPTS_OPTUNA_STORAGE": url}) == url
    assert shared_storage("sqlite:////tmp/s.db", {"FCPTS_OPTUNA_STORAGE": url}) == (
        "sqlite:////tmp/s.db"
    )
    with pytest.raises(UserError, match="FCPTS_OPTUNA_STORAGE"):
        shared_storage("", {})
