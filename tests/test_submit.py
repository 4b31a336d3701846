"""fcpts submit: schedules, hosts, config -> pipeline parameters, secrets in the compiled
spec, and a clear error for a KFP API that cannot be reached (no live cluster here)."""

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import services
import yaml

from fcpts.cli import kfp_cluster
from fcpts.cli import submit as sub
from fcpts.cli.kfp_cluster import SubmitConfig, check_host
from fcpts.cli.schedule import CRON_HELP, Schedule, parse_schedule
from fcpts.cli.submit import Parameter, config_options, parameter_arguments, sparsify_arguments
from fcpts.errors import ServiceError, UserError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines import k8s  # noqa: E402

# ------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("0 0 3 * * *", Schedule(cron="0 0 3 * * *")),
        ("  0  0 3 * * *  ", Schedule(cron="0 0 3 * * *")),
        ("*/10 * * * * *", Schedule(cron="*/10 * * * * *")),
        ("0 30 9 ? * MON-FRI", Schedule(cron="0 30 9 ? * MON-FRI")),
        ("0 0 9 ? * 2-6", Schedule(cron="0 0 9 ? * 2-6")),
        ("0 0,30 8-18/2 1,15 jan,jul *", Schedule(cron="0 0,30 8-18/2 1,15 jan,jul *")),
        ("@daily", Schedule(cron="0 0 0 * * *")),
        ("@Hourly", Schedule(cron="0 0 * * * *")),
        ("@weekly", Schedule(cron="0 0 0 * * 0")),
        ("@every 1h30m", Schedule(interval_second=5400)),
        ("@every 90s", Schedule(interval_second=90)),
        ("@every 6h", Schedule(interval_second=21600)),
    ],
)
def test_valid_schedules(text, want):
    assert parse_schedule(text) == want


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("0 3 * * *", "5 fields .*put 0 in front"),
        ("0 0 3 * * * *", "7 fields"),
        ("", "it is empty"),
        ("60 0 3 * * *", "60 in the seconds field is outside 0-59"),
        ("0 0 24 * * *", "24 in the hours field"),
        ("0 0 3 0 * *", "0 in the day of month field is outside 1-31"),
        ("0 0 3 * 13 *", "13 in the month field"),
        ("0 0 3 * * 7", "7 in the day of week field is outside 0-6"),
        ("? 0 3 * * *", "'\\?' is allowed only in the day fields"),
        ("0 0 3 * * FOO", "'FOO' in the day of week field is not a number"),
        ("*/0 * * * * *", "step '0'"),
        ("0 0 5-3 * * *", "range '5-3' in the hours field runs backwards"),
        ("@often", "unknown descriptor '@often'"),
        ("@every 0s", "at least 1s"),
        ("@every 1.5s", "whole number of seconds"),
        ("@every tomorrow", "not a duration"),
        # croniter takes these; KFP's robfig/cron does not
        ("0 0 3 L * *", "'L' in the day of month field is not a number"),
        ("0 0 3 * * 1#2", "'1#2' in the day of week field is not a number"),
        ("0 0 3 * * 0-7", "7 in the day of week field is outside 0-6"),
        ("0 0 22-2 * * *", "range '22-2' in the hours field runs backwards"),
    ],
)
def test_invalid_schedules(text, why):
    with pytest.raises(UserError, match=why) as info:
        parse_schedule(text)
    assert CRON_HELP in str(info.value)
    assert str(info.value).startswith(f"--schedule {text!r}")


# ------------------------------------------------------------------------------ hosts


def test_valid_hosts():
    assert check_host("http://localhost:8080") == "http://localhost:8080"
    assert check_host(" https://kubeflow.example.com/pipeline/ ") == (
        "https://kubeflow.example.com/pipeline"
    )
    assert check_host("http://10.0.0.1:8888") == "http://10.0.0.1:8888"
    assert check_host("http://[::1]:8888") == "http://[::1]:8888"


@pytest.mark.parametrize(
    ("host", "why"),
    [
        ("", "--host is required"),
        ("localhost:8080", "must start with http:// or https://"),
        ("ftp://kfp.example.com", "must start with http:// or https://"),
        ("http://:8080", "name a host"),
        ("http://admin:hunter2@kfp.example.com", "must not carry credentials"),
        ("https://token@kfp.example.com", "must not carry credentials"),
        ("http://kfp.example.com:99999", "not a valid URL"),
        ("http://kfp.example.com:0", "port must be 1-65535"),
        ("http://kfp.example.com/?ns=x", "query or a fragment"),
    ],
)
def test_invalid_hosts(host, why):
    with pytest.raises(UserError, match=why) as info:
        check_host(host)
    assert "hunter2" not in str(info.value)


def test_submit_config_validation():
    with pytest.raises(UserError, match="--pipeline must be one of sparsify, sweep"):
        SubmitConfig(host="http://h:1", pipeline="train")
    with pytest.raises(UserError, match="--namespace 'Team_A'"):
        SubmitConfig(host="http://h:1", namespace="Team_A")
    with pytest.raises(UserError, match="--experiment is empty"):
        SubmitConfig(host="http://h:1", experiment=" ")
    assert SubmitConfig(host="http://h:1/").host == "http://h:1"


# ------------------------------------------------------------------ config -> params


@pytest.fixture(scope="module")
def sparsify_parameters():
    return sub.pipeline_parameters(kfp_cluster.load_pipeline("sparsify"))


def test_run_config_maps_to_sparsify_parameters(sparsify_parameters):
    config = {
        "model": "s3://models/minilm/",
        "data": "s3://data/sentences.txt",
        "target": 0.7,
        "iters": 50,
        "lam": 2,
        "settings": {"schedule": "constant"},
        "settings_flags": ["ste_width=0.5"],
        "exclude": "pooler.*,classifier.*",
        "bounds": ["encoder.*=0:0.9"],
        "batch_size": 32,
        "tolerance": "0.1",
        "recalibrate_bn": True,
        "root": "runs",  # local runner options are skipped
        "cache": True,
        "host": "http://kfp:8080",  # submit's own options too
        "run": {"target": 0.8, "seed": 3},  # the run section overrides the top level
        "allocate": {"out": "elsewhere"},  # other commands' sections are ignored
    }
    args = sparsify_arguments(config_options(config))
    assert set(args) == set(sparsify_parameters)  # every parameter, as `fcpts run` passes them
    assert json.loads(args.pop("settings")) == {
        "schedule": "constant",
        "ste_width": 0.5,
        "iters": 50,
        "lam": 2,
    }
    assert json.loads(args.pop("selection")) == {
        "exclude": ["pooler.*", "classifier.*"],
        "bounds": {"encoder.*": [0.0, 0.9]},
    }
    given = {
        "model": "s3://models/minilm/",
        "data": "s3://data/sentences.txt",
        "target": 0.8,
        "batch_size": 32,
        "tolerance": 0.1,
        "recalibrate_bn": True,
        "seed": 3,
    }
    assert {k: args[k] for k in given} == given
    assert all(args[k] == sparsify_parameters[k].default for k in set(args) - set(given))
    # no options: the pipeline's own defaults
    assert sparsify_arguments({}) == {k: p.default for k, p in sparsify_parameters.items()}


def test_config_mistakes_are_named():
    with pytest.raises(UserError, match="'targte' is not a parameter of the sparsify pipeline"):
        sparsify_arguments({"targte": 0.5})
    with pytest.raises(UserError, match="config file: batch_size must be a whole number"):
        sparsify_arguments({"batch_size": 3.5})
    with pytest.raises(UserError, match="config file: target must be a float, got 'high'"):
        sparsify_arguments({"target": "high"})
    with pytest.raises(UserError, match="config file: recalibrate_bn must be true or false"):
        sparsify_arguments({"recalibrate_bn": "yes"})
    with pytest.raises(UserError, match="'selection' is not a parameter of the sparsify pipeline"):
        sparsify_arguments({"selection": "{}", "exclude": ["a"]})
    with pytest.raises(UserError, match="'selection' both directly and through its options"):
        parameter_arguments(
            {"selection": "{}", "exclude": ["a"]}, {"selection": Parameter("String")}
        )
    with pytest.raises(UserError, match="section 'run' must be a mapping"):
        config_options({"run": ["target"]})


def test_sweep_needs_storage():
    params = {"storage": Parameter("String", required=True), "trials": Parameter("Integer")}
    with pytest.raises(UserError, match="the sweep pipeline needs 'storage'"):
        parameter_arguments({"trials": 4}, params, "sweep")
    options = config_options(
        {"trials": 2, "sweep": {"trials": 4, "storage": "sqlite:///x"}}, "sweep"
    )
    assert parameter_arguments(options, params, "sweep") == {"storage": "sqlite:///x", "trials": 4}


# ---------------------------------------------------------------------------- secrets


def test_secret_names_and_steps():
    assert k8s.secret_names({}) == {
        "s3": "fcpts-s3",
        "mlflow": "fcpts-mlflow",
        "optuna": "fcpts-optuna-db",
    }
    env = {"FCPTS_K8S_S3_SECRET": "team-s3", "FCPTS_K8S_MLFLOW_SECRET": ""}
    assert k8s.secret_names(env) == {"s3": "team-s3", "optuna": "fcpts-optuna-db"}
    assert set(k8s.secret_env("allocate", env)) == {"team-s3"}
    assert set(k8s.secret_env("sweep-worker", {})) == {
        "fcpts-s3",
        "fcpts-mlflow",
        "fcpts-optuna-db",
    }
    with pytest.raises(ValueError, match="unknown pipeline step 'train'"):
        k8s.secret_env("train")


def _tiny_package(path: Path, step: str = "allocate") -> Path:
    from kfp import compiler, dsl

    @dsl.component(base_image="python:3.11")
    def hello(x: str) -> str:
        return x

    @dsl.pipeline(name="tiny")
    def tiny(x: str = "a"):
        k8s.use_secrets(hello(x=x), step)

    compiler.Compiler().compile(tiny, str(path))
    return path


def test_compiled_spec_references_secrets_not_values(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3-secret-value-never-compiled")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "mlflow-password-never-compiled")
    package = _tiny_package(tmp_path / "tiny.yaml", "sweep-best")
    text = package.read_text()
    assert "never-compiled" not in text
    docs = list(yaml.safe_load_all(text))
    platform = next(d for d in docs if "platforms" in d)
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    refs = executors["exec-hello"]["secretAsEnv"]
    by_name = {r["secretName"]: r for r in refs}
    assert set(by_name) == {"fcpts-s3", "fcpts-mlflow", "fcpts-optuna-db"}
    assert all(r.get("optional") for r in refs)
    s3_keys = {kv["secretKey"]: kv["envVar"] for kv in by_name["fcpts-s3"]["keyToEnv"]}
    assert s3_keys["AWS_SECRET_ACCESS_KEY"] == "AWS_SECRET_ACCESS_KEY"
    assert {kv["envVar"] for kv in by_name["fcpts-optuna-db"]["keyToEnv"]} == {
        "FCPTS_OPTUNA_STORAGE"
    }


# ---------------------------------------------------------------------------- submit


class FakeClient:
    def __init__(self):
        self.calls = []

    def create_run_from_pipeline_package(self, package, **kwargs):
        self.calls.append(("run", Path(package).is_file(), kwargs))
        return SimpleNamespace(run_id="run-1")

    def create_experiment(self, name, namespace=None):
        self.calls.append(("experiment", name, namespace))
        return SimpleNamespace(experiment_id="exp-1")

    def create_recurring_run(self, **kwargs):
        self.calls.append(("recurring", kwargs))
        return SimpleNamespace(recurring_run_id="job-1")


def test_submit_calls_kfp(tmp_path):
    package = _tiny_package(tmp_path / "tiny.yaml")
    client = FakeClient()
    config = SubmitConfig(host="http://kfp:8080", experiment="exp", run_name="r")
    result = kfp_cluster.submit(config, package, {"target": 0.7}, client=client)
    assert result == {
        "kind": "run",
        "id": "run-1",
        "name": "r",
        "url": "http://kfp:8080/#/runs/details/run-1",
    }
    kind, exists, kwargs = client.calls[0]
    assert (kind, exists) == ("run", True)
    assert kwargs == {
        "arguments": {"target": 0.7},
        "run_name": "r",
        "experiment_name": "exp",
        "namespace": None,
    }

    client = FakeClient()
    for schedule, cron, every in (("0 0 3 * * *", "0 0 3 * * *", None), ("@every 2h", None, 7200)):
        client = FakeClient()
        config = SubmitConfig(
            host="http://kfp:8080", schedule=parse_schedule(schedule), namespace="team-a"
        )
        result = kfp_cluster.submit(config, package, {}, client=client)
        assert result["kind"] == "recurring run" and result["id"] == "job-1"
        assert client.calls[0] == ("experiment", "fcpts", "team-a")
        job = client.calls[1][1]
        assert (job["cron_expression"], job["interval_second"]) == (cron, every)
        assert job["experiment_id"] == "exp-1" and job["max_concurrency"] == 1


def test_unreachable_host_is_a_service_error(tmp_path):
    host = f"http://127.0.0.1:{services.free_port()}"  # nothing listens there
    package = _tiny_package(tmp_path / "tiny.yaml")
    for schedule in (None, Schedule(cron="0 0 3 * * *")):
        with pytest.raises(ServiceError, match=f"cannot reach the KFP API at {host}"):
            kfp_cluster.submit(SubmitConfig(host=host, schedule=schedule), package, {})

    parser = argparse.ArgumentParser()
    sub.add_parsers(parser.add_subparsers(dest="command"))
    (tmp_path / "run.yaml").write_text("target: 0.7\niters: 20\nroot: runs\n")
    args = parser.parse_args(
        ["submit", "--host", host, "--config", str(tmp_path / "run.yaml"), "--run-name", "x"]
    )
    with pytest.raises(ServiceError, match=f"KFP API at {host}"):
        sub.COMMANDS["submit"](args)

    # a mistake in the pipeline options fails before any request
    (tmp_path / "bad.yaml").write_text("target: 1.5\n")
    args.config = str(tmp_path / "bad.yaml")
    with pytest.raises(UserError, match="1.5"):
        sub.COMMANDS["submit"](args)
    (tmp_path / "bad.yaml").write_text("method: fcpts\nsettings: {lamda: 2}\n")
    with pytest.raises(UserError, match="no setting 'lamda'"):
        sub.COMMANDS["submit"](args)
