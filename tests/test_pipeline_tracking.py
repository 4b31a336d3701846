"""The sparsify pipeline tracked in MLflow and registered, end to end: KFP's local runner
(``fcpts run``: SubprocessRunner, no venv) on the digits demo against the embedded SQLite
store, an MLflow server on SQLite and an MLflow server on PostgreSQL + S3 (moto); the
champion/challenger rules across targets; ``fcpts promote``/``rollback``; a tracking
server that dies mid-pipeline and ``fcpts register --from``; concurrent ``fcpts
register`` processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pytest  # noqa: E402
import services  # noqa: E402
import torch  # noqa: E402
from conftest import REPO_ROOT, run_fcpts  # noqa: E402
from test_tracking import _artifacts  # noqa: E402

from fcpts.cli import main  # noqa: E402
from fcpts.demos import load_demo  # noqa: E402
from fcpts.sparse_model import load_sparse  # noqa: E402
from fcpts.tracking.connection import Store  # noqa: E402
from fcpts.tracking.names import EVALUATION_PARAM_NAMES, param_names  # noqa: E402

pytestmark = pytest.mark.slow

ITERS = 20
SERVERS = {"server-sqlite": "mlflow_sqlite_server", "server-pg-s3": "mlflow_pg_s3_server"}
STEPS = ("calibrate", "allocate", "evaluate", "register")


def _pipeline_args(root, target, name, experiment, uri=None):
    args = ["run", "--model", "demo:digits-cnn", "--target", target, "--iters", ITERS]
    args += ["--calibration-samples", 64, "--evaluation-samples", 100, "--latency-seconds", 0.02]
    args += ["--tolerance", 1, "--root", root, "--name", name, "--experiment", experiment]
    return args + (["--tracking-uri", uri] if uri else [])


def _pipeline(root, target, name, experiment, uri=None, **kwargs):
    """One `fcpts run`; returns (run folder, pipeline run id, stdout)."""
    r = run_fcpts(*_pipeline_args(root, target, name, experiment, uri), **kwargs)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run_dir = Path(re.search(r"^artifacts: (\S+)", r.stdout, re.M)[1])
    pid = re.search(r"^mlflow: pipeline run (\S+) in experiment ", r.stdout, re.M)[1]
    return run_dir, pid, r.stdout


def _client(uri):
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


def _the_run(client, experiment, pid):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert [r.data.tags["fcpts.pipeline_run_id"] for r in runs].count(pid) == 1
    return next(r for r in runs if r.data.tags["fcpts.pipeline_run_id"] == pid)


def _same_outputs(uri, model_uri, sparse_dir):
    """The model MLflow gives back computes what the sparse model the pipeline wrote does."""
    demo = load_demo("demo:digits-cnn")
    sparse_net, _ = load_sparse(demo.model, sparse_dir)
    with Store(uri).fluent():
        loaded = mlflow.pytorch.load_model(model_uri)
    x = demo.split("evaluation", 48, 48)[0]["x"]
    with torch.no_grad():
        assert torch.allclose(loaded(x), sparse_net.eval()(x), atol=1e-6)


def _check_tracked_run(client, run, run_dir):
    """One MLflow run holds every step: params, metrics, curves, artifacts, datasets, tags."""
    manifest = json.loads((run_dir / "allocate" / "sparse_model" / "manifest.json").read_text())
    metrics = json.loads((run_dir / "evaluate" / "evaluation" / "metrics.json").read_text())
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert set(param_names()) | set(EVALUATION_PARAM_NAMES) == set(params)
    tail = run.data.tags["fcpts.pipeline_run_id"].rsplit("-", 1)[-1]
    assert run.info.run_name == f"digits-cnn-fcpts-{manifest['target']:g}-{tail}"
    assert params["target"] == repr(manifest["target"]) and params["allocator"] == "fcpts"
    assert params["iters"] == str(ITERS) and params["calibration_samples"] == "64"
    assert params["model_source"] == "demo:digits-cnn" and params["seed"] == "0"
    assert params["model_digest"] == manifest["dense_model_sha256"]
    assert params["metric"] == "top1" and params["evaluation_samples"] == "100"

    m = run.data.metrics
    assert m["evaluate/dense"] == metrics["dense"] and m["evaluate/sparse"] == metrics["sparse"]
    assert m["evaluate/delta"] == pytest.approx(metrics["sparse"] - metrics["dense"])
    assert m["allocate/achieved_sparsity"] == manifest["achieved_sparsity"]
    assert run.data.tags["fcpts.exact"] == "true" and params["prunable"] == str(metrics["prunable"])
    assert not [k for k in m if k.endswith(("exact", "prunable", ".seed", ".threads"))]
    for step in STEPS:
        assert m[f"{step}/seconds"] > 0 and run.data.tags[f"fcpts.step.{step}"] == "done"
    for key in ("loss", "global_sparsity"):
        points = client.get_metric_history(run.info.run_id, f"allocate/{key}")
        assert sorted(p.step for p in points) == list(range(ITERS))
    last = max(client.get_metric_history(run.info.run_id, "allocate/loss"), key=lambda p: p.step)
    assert last.value == pytest.approx(manifest["history"][-1]["loss"])

    assert {
        "allocation.png",
        "layers.json",
        "allocation/manifest.json",
        "evaluation/metrics.json",
        "evaluation/report.html",
        "evaluation/report.md",
        "registration/decision.json",
    } <= _artifacts(client, run.info.run_id)
    contexts = {
        {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in run.inputs.dataset_inputs
    }
    assert contexts == {"calibration", "evaluation"}
    tags = run.data.tags
    assert tags["fcpts.gate"] == "approved" and tags["fcpts.model_uri"].startswith("models:/")
    assert tags["fcpts.calibration_digest"] and tags["fcpts.evaluation_digest"]


# ------------------------------------------------------------------ embedded store


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """`fcpts run` at target 0.9 with no tracking option and no $MLFLOW_TRACKING_URI:
    the embedded store ./mlruns of the folder it runs in."""
    here = tmp_path_factory.mktemp("embedded")
    name, experiment = "digits-embedded", "fcpts"
    run_dir, pid, out = _pipeline(
        here / "runs", 0.9, name, experiment, cwd=here, env={"MLFLOW_TRACKING_URI": ""}
    )
    uri = f"sqlite:///{here / 'mlruns' / 'mlflow.db'}"
    return {"here": here, "uri": uri, "name": name, "run_dir": run_dir, "pid": pid, "out": out}


def test_embedded_store_run_is_tracked_and_registered(embedded):
    uri, name = embedded["uri"], embedded["name"]
    assert f"mlflow ui --backend-store-uri {uri}" in embedded["out"]
    assert list((embedded["here"] / "mlruns" / "artifacts").rglob("manifest.json"))
    client = _client(uri)
    run = _the_run(client, "fcpts", embedded["pid"])
    _check_tracked_run(client, run, embedded["run_dir"])
    champion = client.get_model_version_by_alias(name, "champion")
    assert str(champion.version) == "1" and champion.tags["source_run_id"] == run.info.run_id
    assert champion.tags["target"] == "0.9" and champion.tags["decision"] == "champion"
    _same_outputs(
        uri, f"models:/{name}@champion", embedded["run_dir"] / "allocate" / "sparse_model"
    )


def test_lower_sparsity_stays_challenger_then_promote_and_rollback(embedded, capsys):
    uri, name = embedded["uri"], embedded["name"]
    run_dir, pid, out = _pipeline(embedded["here"] / "runs", 0.7, name, "fcpts", uri=uri)
    client = _client(uri)
    v2 = client.get_model_version_by_alias(name, "challenger")
    assert str(v2.version) == "2" and v2.tags["target"] == "0.7"
    assert v2.tags["decision"] == "challenger"
    assert "lower sparsity never displaces the champion" in v2.tags["decision_reason"]
    assert v2.tags["decision_reason"] in v2.description
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert len(client.search_runs([client.get_experiment_by_name("fcpts").experiment_id])) == 2

    r = run_fcpts("promote", name, "2", "--reason", "serve the denser one", "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "champion is version 2 (was version 1)" in r.stdout
    promoted = client.get_model_version_by_alias(name, "champion")
    assert (
        str(promoted.version) == "2" and promoted.tags["decision_reason"] == "serve the denser one"
    )
    _same_outputs(uri, f"models:/{name}@champion", run_dir / "allocate" / "sparse_model")

    r = run_fcpts("rollback", name, "--tracking-uri", uri)
    assert r.returncode == 0, r.stderr
    assert "champion is version 1 (was version 2)" in r.stdout
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert client.get_model_version(name, "2").tags["decision"] == "rolled back"

    for args, message in (
        (("promote", "no-such-model", "1"), "there is no registered model 'no-such-model'"),
        (("promote", name, "9"), f"model '{name}' has no version '9'"),
        (("promote", name, "two"), "VERSION must be a version number"),
        (("rollback", "no-such-model"), "there is no registered model 'no-such-model'"),
        (("register", "--from", run_dir / "nowhere"), "no such folder"),
        (("register", "--from", run_dir / "allocate"), "no result there"),
    ):
        assert main([str(a) for a in (*args, "--tracking-uri", uri)]) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)

    # four `fcpts register` processes at once, two per pipeline run, to one new model name
    race = f"digits-race-{uuid.uuid4().hex[:6]}"
    procs = []
    for folder in (embedded["run_dir"], run_dir, embedded["run_dir"], run_dir):
        cmd = [str(Path(sys.executable).with_name("fcpts")), "register", "--tolerance", "1"]
        cmd += ["--metrics", folder / "evaluate" / "evaluation"]
        cmd += ["--sparse", folder / "allocate" / "sparse_model", "--name", race]
        cmd += ["--tracking-uri", uri, "--out", folder / f"race-{len(procs)}"]
        procs.append(
            subprocess.Popen(
                [str(c) for c in cmd],
                cwd=REPO_ROOT,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
    results = [p.communicate(timeout=services.HANG_GUARD_S) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), [err[-2000:] for _, err, _ in results]
    versions = client.search_model_versions(f"name = '{race}'")
    assert len(versions) == 2 and len({v.tags["source_run_id"] for v in versions}) == 2
    champions = [v for v in versions if v.tags["decision"] == "champion"]
    assert [str(v.version) for v in champions] == [
        str(client.get_model_version_by_alias(race, "champion").version)
    ]


# ------------------------------------------------------------------ MLflow servers


@pytest.mark.parametrize("server", list(SERVERS.values()), ids=list(SERVERS))
@pytest.mark.filterwarnings("ignore:.*non-Python base image.*")
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner.*")
def test_server_run_is_tracked_and_registered(server, request, tmp_path):
    """The pipeline itself in kfp.local (no pipeline_run_id given: the steps share the KFP
    run's id) against a real MLflow server."""
    from kfp import local

    from fcpts.cli import load_pipeline_module

    uri = request.getfixturevalue(server).tracking_uri
    name, experiment = f"digits-{uuid.uuid4().hex[:6]}", f"pipeline-{uuid.uuid4().hex[:6]}"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "runs"),
        raise_on_error=True,
    )
    outputs = (
        load_pipeline_module()
        .build(retries=False)(
            model="demo:digits-cnn",
            target=0.7,
            settings=json.dumps({"iters": ITERS}),
            calibration_samples=64,
            evaluation_samples=100,
            tolerance=1.0,
            name=name,
            tracking_uri=uri,
            experiment=experiment,
        )
        .outputs
    )
    run_dir = Path(outputs["evaluation"].path).parent.parent
    client = _client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    pid = run.data.tags["fcpts.pipeline_run_id"]
    assert pid and "{" not in pid
    _check_tracked_run(client, run, run_dir)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.tags["source_run_id"] == run.info.run_id
    _same_outputs(uri, f"models:/{name}@champion", run_dir / "allocate" / "sparse_model")


def test_server_down_mid_pipeline_then_register_from(tmp_path):
    """The server stops after allocate: evaluate writes its result, then fails naming the
    server; nothing is registered; `fcpts register --from` against the restarted server
    logs the rest and registers it, once."""
    backend = f"sqlite:///{tmp_path / 'backend.db'}"
    artifacts = str(tmp_path / "artifacts")
    name, experiment = "digits-fault", "fault"
    env = dict(os.environ, HF_HUB_OFFLINE="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="1")
    exe = str(Path(sys.executable).with_name("fcpts"))
    with services.start_mlflow_server(tmp_path / "first", backend, artifacts) as first:
        args = _pipeline_args(tmp_path / "runs", 0.7, name, experiment, first.tracking_uri)
        proc = subprocess.Popen(
            [exe, *map(str, args)],
            cwd=REPO_ROOT,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "[2/4] allocate done" in line:
                first.stop()  # kills the server's process group (tests/services.py)
        out, _ = proc.communicate(timeout=services.HANG_GUARD_S)
    err = "".join(lines)
    assert proc.returncode == 1, out + err
    assert "pipeline step evaluate failed" in err and first.tracking_uri in err, err
    (run_dir,) = (tmp_path / "runs").glob("fcpts-sparsify-*")
    assert (run_dir / "evaluate" / "evaluation" / "metrics.json").is_file()
    assert not (run_dir / "register").exists()

    with services.start_mlflow_server(tmp_path / "second", backend, artifacts) as second:
        uri = second.tracking_uri
        client = _client(uri)
        assert not client.search_model_versions(f"name = '{name}'")
        (before,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert before.data.tags["fcpts.step.allocate"] == "done"
        assert "evaluate/sparse" not in before.data.metrics

        for attempt in range(2):
            r = run_fcpts(
                "register",
                "--from",
                run_dir,
                "--tolerance",
                1,
                "--name",
                name,
                "--tracking-uri",
                uri,
            )
            assert r.returncode == 0, r.stderr[-3000:]
            created = "(a new version)" if attempt == 0 else "(registered before, none added)"
            assert created in r.stdout, r.stdout
        (version,) = client.search_model_versions(f"name = '{name}'")
        assert str(client.get_model_version_by_alias(name, "champion").version) == str(
            version.version
        )
        run = client.get_run(before.info.run_id)
        assert version.tags["source_run_id"] == run.info.run_id
        assert run.data.tags["fcpts.backfilled.evaluate"] == "true"
        assert run.data.metrics["evaluate/sparse"] > 0 and run.data.tags["fcpts.model_uri"]
        assert (run_dir / "register" / "decision" / "decision.json").is_file()
        _same_outputs(uri, f"models:/{name}@champion", run_dir / "allocate" / "sparse_model")


# ------------------------------------------------------------------ library steps


def test_steps_chained_by_their_folders_share_one_run(tmp_path):
    """The steps called one by one with no pipeline run id continue the run recorded in
    their input folder: one MLflow run; a step that fails marks it."""
    from fcpts.steps import Sources, Tracking, allocate, calibrate, evaluate, register

    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    tracking = Tracking(uri, experiment="chained")
    cal = calibrate(
        Sources(model="demo:digits-cnn"),
        tmp_path / "cal",
        samples=64,
        batch_size=32,
        tracking=tracking,
    )
    pid = cal.info["tracking"]["pipeline_run_id"]
    sparse = allocate(
        cal.path, tmp_path / "sparse", target=0.7, settings={"iters": 5}, tracking=Tracking(uri)
    )
    assert sparse.manifest["tracking"]["pipeline_run_id"] == pid
    ev = evaluate(
        Sources(model="demo:digits-cnn"),
        sparse.path,
        tmp_path / "eval",
        samples=64,
        tolerance=1.0,
        latency_seconds=0.01,
        tracking=Tracking(uri),
    )
    reg = register(
        ev.path,
        sparse.path,
        tmp_path / "reg",
        tolerance=1.0,
        name="digits-chained",
        tracking=Tracking(uri),
    )
    assert reg.record["registration"]["status"] == "registered"
    client = _client(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("chained").experiment_id])
    assert run.data.tags["fcpts.pipeline_run_id"] == pid and run.info.status == "FINISHED"
    assert {run.data.tags[f"fcpts.step.{s}"] for s in STEPS} == {"done"}
    assert reg.record["registration"]["run_id"] == run.info.run_id

    # a step whose work fails marks its run failed; the step's own error is the one raised
    def boom(iteration, record):
        raise RuntimeError("boom")

    broken = Tracking(uri, experiment="chained", pipeline_run_id="broken-run")
    with pytest.raises(RuntimeError, match="boom"):
        allocate(cal.path, tmp_path / "x", target=0.7, callback=boom, tracking=broken)
    (failed,) = client.search_runs(
        [client.get_experiment_by_name("chained").experiment_id],
        "tags.`fcpts.pipeline_run_id` = 'broken-run'",
    )
    assert failed.info.status == "FAILED" and failed.data.tags["fcpts.failed_step"] == "allocate"
