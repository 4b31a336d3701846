"""The cluster path: compile options (image, accelerators, checkpoint PVC) in the compiled
YAML, read back as KFP protos (PipelineSpec, PlatformSpec, KubernetesExecutorConfig); the
tracking default of a KFP step; a retry of allocate in a new process resuming from the
checkpoint volume; `make image` with and without a working container builder; the lock."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb
from kfp.pipeline_spec import pipeline_spec_pb2 as spec_pb

from fcpts.cli import main
from fcpts.steps import entry

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from components import IMAGE  # noqa: E402
from pipelines import k8s  # noqa: E402

HANG_GUARD_S = 600
CHAIN = ("calibrate", "allocate", "evaluate", "register")


@pytest.fixture(autouse=True)
def _no_image_environment(monkeypatch):
    for name in (k8s.IMAGE_ENV, k8s.CUDA_IMAGE_ENV, "FCPTS_K8S_MLFLOW_SECRET"):
        monkeypatch.delenv(name, raising=False)


def compiled(tmp_path: Path, *flags: str) -> dict[str, tuple]:
    """`fcpts compile FLAGS`: per pipeline (sparsify, sweep), its PipelineSpec, the
    PipelineDeploymentConfig and each executor's KubernetesExecutorConfig."""
    out, sweep_out = tmp_path / "sparsify.yaml", tmp_path / "sweep.yaml"
    assert main(["compile", "--out", str(out), "--sweep-out", str(sweep_out), *flags]) == 0
    result = {}
    for name, path in (("sparsify", out), ("sweep", sweep_out)):
        docs = list(yaml.safe_load_all(path.read_text()))
        assert len(docs) == 2, "a pipeline spec, then the Kubernetes platform spec"
        pipeline = json_format.ParseDict(docs[0], spec_pb.PipelineSpec())
        deployment = json_format.ParseDict(
            json_format.MessageToDict(pipeline.deployment_spec),
            spec_pb.PipelineDeploymentConfig(),
        )
        platform = json_format.ParseDict(docs[1], spec_pb.PlatformSpec())
        executors = platform.platforms["kubernetes"].deployment_spec.executors
        kubernetes = {
            key: json_format.ParseDict(
                json_format.MessageToDict(value), k8s_pb.KubernetesExecutorConfig()
            )
            for key, value in executors.items()
        }
        result[name] = (pipeline, deployment, kubernetes)
    return result


def containers(deployment) -> dict[str, object]:
    return {
        key.removeprefix("exec-"): value.container for key, value in deployment.executors.items()
    }


def test_defaults_compile_to_the_project_image_without_accelerators_or_volumes(tmp_path):
    for pipeline, deployment, kubernetes in compiled(tmp_path).values():
        assert pipeline.pipeline_info.name.startswith("fcpts-")
        for step, container in containers(deployment).items():
            assert container.image == IMAGE, step
            assert not container.resources.accelerator.resource_count, step
            assert not any(e.name == entry.CHECKPOINT_ROOT_ENV for e in container.env), step
        for config in kubernetes.values():
            assert not config.pvc_mount and not config.tolerations
            # the MLflow secret gives the steps MLFLOW_TRACKING_URI (an empty tracking_uri
            # parameter then tracks there), optional: a cluster without it runs the same spec
            mlflow = [s for s in config.secret_as_env if s.secret_name == "fcpts-mlflow"]
            assert len(mlflow) == 1 and mlflow[0].optional
            keys = {kv.secret_key: kv.env_var for kv in mlflow[0].key_to_env}
            assert keys["MLFLOW_TRACKING_URI"] == "MLFLOW_TRACKING_URI"


def test_image_gpu_and_checkpoint_pvc_in_the_compiled_specs(tmp_path):
    image = "registry.example.com:5000/team/fcpts:1.2"
    specs = compiled(
        tmp_path, "--image", image, "--gpu", "2", "--checkpoint-pvc", "fcpts-checkpoints"
    )
    _, deployment, kubernetes = specs["sparsify"]
    steps = containers(deployment)
    assert set(steps) == set(CHAIN)
    for step, container in steps.items():
        accelerator = container.resources.accelerator
        if step == "allocate":
            assert container.image == f"{image}-cuda"
            assert (accelerator.resource_type, accelerator.resource_count) == (
                "nvidia.com/gpu",
                "2",
            )
            env = {e.name: e.value for e in container.env}
            assert env[entry.CHECKPOINT_ROOT_ENV] == k8s.CHECKPOINT_MOUNT
        else:
            assert container.image == image, step
            assert not accelerator.resource_count, step
    for key, config in kubernetes.items():
        if key == "exec-allocate":
            (mount,) = config.pvc_mount
            assert mount.mount_path == k8s.CHECKPOINT_MOUNT
            assert mount.pvc_name_parameter.runtime_value.constant.string_value == (
                "fcpts-checkpoints"
            )
            (toleration,) = config.tolerations
            assert (toleration.key, toleration.operator, toleration.effect) == (
                "nvidia.com/gpu",
                "Exists",
                "NoSchedule",
            )
        else:
            assert not config.pvc_mount and not config.tolerations, key
        assert {s.secret_name for s in config.secret_as_env} >= {"fcpts-s3", "fcpts-mlflow"}

    _, deployment, kubernetes = specs["sweep"]
    images = {step: c.image for step, c in containers(deployment).items()}
    cuda = {step for step, i in images.items() if i == f"{image}-cuda"}
    assert cuda == {"sweep-worker", "allocate"} and set(images.values()) == {image, f"{image}-cuda"}
    worker = containers(deployment)["sweep-worker"].resources.accelerator
    assert worker.resource_count == "2"
    assert [k for k, c in kubernetes.items() if c.pvc_mount] == ["exec-allocate"]


def test_environment_defaults_and_flags_over_them(tmp_path, monkeypatch):
    monkeypatch.setenv(k8s.IMAGE_ENV, "team/fcpts:env")
    monkeypatch.setenv(k8s.CUDA_IMAGE_ENV, "team/fcpts-gpu:env")
    _, deployment, _ = compiled(tmp_path, "--gpu", "1", "--gpu-type", "amd.com/gpu")["sparsify"]
    steps = containers(deployment)
    assert steps["calibrate"].image == "team/fcpts:env"
    assert steps["allocate"].image == "team/fcpts-gpu:env"
    assert steps["allocate"].resources.accelerator.resource_type == "amd.com/gpu"
    _, deployment, _ = compiled(tmp_path, "--image", "flag/fcpts:1")["sparsify"]
    assert {c.image for c in containers(deployment).values()} == {"flag/fcpts:1"}


def test_cluster_options_from_a_config_file(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"image": "cfg/fcpts:3", "checkpoint_pvc": "ckpt"}))
    _, deployment, kubernetes = compiled(tmp_path, "--config", str(config))["sparsify"]
    assert {c.image for c in containers(deployment).values()} == {"cfg/fcpts:3"}
    assert kubernetes["exec-allocate"].pvc_mount[0].pvc_name_parameter.runtime_value.constant.string_value == "ckpt"  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image", "Team/FCPTS latest"], "--image 'Team/FCPTS latest' is not an image reference"),
        (["--gpu", "-1"], "--gpu must be a whole number"),
        (
            ["--checkpoint-pvc", "My_PVC"],
            "--checkpoint-pvc 'My_PVC' is not a PersistentVolumeClaim",
        ),
        (["--gpu", "1", "--gpu-type", "nvidia gpu"], "--gpu-type 'nvidia gpu'"),
        (
            ["--gpu", "1", "--image", "team/fcpts@sha256:" + "a" * 64],
            "pinned by digest.*give --cuda-image",
        ),
    ],
)
def test_bad_cluster_options_are_named(tmp_path, capsys, flags, message):
    out = tmp_path / "p.yaml"
    assert main(["compile", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fcpts: error: ") and "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()


def test_submit_compiles_the_cluster_options_in(tmp_path):
    """fcpts submit takes the same flags; they are compile-time, no pipeline parameters."""
    from fcpts.cli import build_parser
    from fcpts.cli.cluster import cluster_from_args
    from fcpts.cli.kfp_cluster import load_pipeline
    from fcpts.cli.submit import pipeline_options

    args = build_parser().parse_args(
        ["submit", "--host", "http://kfp:8080", "--image", "s/fcpts:1", "--gpu", "1"]
    )
    pipeline = load_pipeline("sparsify", cluster_from_args(args))
    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(tmp_path / "s.yaml"))
    doc = next(yaml.safe_load_all((tmp_path / "s.yaml").read_text()))
    executors = doc["deploymentSpec"]["executors"]
    assert executors["exec-allocate"]["container"]["image"] == "s/fcpts:1-cuda"
    assert executors["exec-evaluate"]["container"]["image"] == "s/fcpts:1"
    assert not {"image", "gpu", "checkpoint_pvc"} & set(
        doc["root"]["inputDefinitions"]["parameters"]
    )
    # a config file's cluster keys are not taken for pipeline parameters
    assert pipeline_options({"image": "x", "gpu": 1, "target": 0.5}) == {"target": 0.5}


# ------------------------------------------------------------------------- tracking


def test_an_empty_tracking_uri_is_the_secrets_and_none_turns_it_off(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.kubeflow:5000")
    inputs = {"tracking_uri": "", "experiment": "", "pipeline_run_id": "", "kfp_run_id": "r-1"}
    tracking = entry.tracking(inputs)
    assert tracking.uri == "http://mlflow.kubeflow:5000" and tracking.pipeline_run_id
    assert entry.tracking({**inputs, "tracking_uri": "none"}) is None
    assert entry.tracking({**inputs, "tracking_uri": " None "}) is None
    assert entry.tracking({**inputs, "tracking_uri": "sqlite:///x.db"}).uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert entry.tracking(inputs) is None  # no secret, no store: no tracking


def test_fcpts_run_without_tracking_passes_none():
    import argparse

    from fcpts.cli.arguments import pipeline_arguments
    from fcpts.steps.tracked import Tracking

    defaults = {"tracking_uri": "", "experiment": "", "pipeline_run_id": "", "target": 0.5}
    args = argparse.Namespace(target=0.7)
    off = pipeline_arguments(args, {}, None, parameters=defaults)
    assert off["tracking_uri"] == "none" and off["target"] == 0.7
    on = pipeline_arguments(args, {}, Tracking("sqlite:///m.db", "e", "p1"), parameters=defaults)
    assert (on["tracking_uri"], on["experiment"], on["pipeline_run_id"]) == (
        "sqlite:///m.db",
        "e",
        "p1",
    )


# ------------------------------------------------------------ checkpoint volume resume

POD = """
import json, sys
from types import SimpleNamespace
from fcpts.steps.entry import run

inputs = json.loads(sys.argv[1])
inputs["calibration"] = SimpleNamespace(path=inputs.pop("calibration_path"), metadata={})
inputs["sparse_model"] = SimpleNamespace(path=inputs.pop("out"), metadata={})
run("allocate", inputs)
"""


def _pod(script: Path, inputs: dict, volume: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", **{entry.CHECKPOINT_ROOT_ENV: str(volume)})
    return subprocess.Popen(
        [sys.executable, str(script), json.dumps(inputs)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_retry_in_a_new_pod_resumes_from_the_checkpoint_volume(digits_calibration, tmp_path):
    """Two processes with nothing in common but the mounted volume and the KFP run id: the
    first is killed after its first checkpoint, the second (another output folder, as a new
    pod has) resumes there and lands on the target."""
    script = tmp_path / "pod.py"
    script.write_text(POD)
    volume = tmp_path / "pvc"
    volume.mkdir()
    inputs = {
        "calibration_path": str(digits_calibration.path),
        "target": 0.7,
        "method": "fcpts",
        "score": "wanda",
        "settings": json.dumps({"iters": 100}),
        "device": "cpu",
        "tracking_uri": "none",
        "kfp_run_id": "run-7f3a",
    }
    checkpoint = volume / "run-7f3a" / "fcpts-checkpoint.safetensors"
    first = _pod(script, {**inputs, "out": str(tmp_path / "pod-1" / "sparse")}, volume)
    deadline = time.monotonic() + HANG_GUARD_S
    while first.poll() is None and not checkpoint.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    first.send_signal(signal.SIGKILL)
    output = first.communicate(timeout=HANG_GUARD_S)[0]
    assert first.returncode == -signal.SIGKILL, output[-2000:]
    assert checkpoint.is_file()

    out = tmp_path / "pod-2" / "sparse"
    second = _pod(script, {**inputs, "out": str(out)}, volume)
    output = second.communicate(timeout=HANG_GUARD_S)[0]
    assert second.returncode == 0, output[-3000:]
    assert f"resuming from the checkpoint {checkpoint}" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["target"] == 0.7 and manifest["exact"]
    assert not checkpoint.exists()  # removed once the output is written


def test_an_unwritable_checkpoint_volume_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(entry.CHECKPOINT_ROOT_ENV, str(tmp_path / "missing"))
    with pytest.raises(entry.UserError, match="--checkpoint-pvc.*not writable"):
        entry.checkpoint_dir({"kfp_run_id": "r"})
    monkeypatch.setenv(entry.CHECKPOINT_ROOT_ENV, str(tmp_path))
    assert entry.checkpoint_dir({"kfp_run_id": "a/b c"}) == str(tmp_path / "a_b_c")
    monkeypatch.delenv(entry.CHECKPOINT_ROOT_ENV)
    assert entry.checkpoint_dir({"kfp_run_id": "r"}) is None


# ------------------------------------------------------------------------ make image


def _fake_bin(tmp_path: Path, tools: dict[str, str]) -> Path:
    """A PATH folder with the few real tools the target needs and the given fake ones."""
    folder = tmp_path / "bin"
    folder.mkdir(parents=True)
    for tool in ("sh", "sed", "grep", "tail", "head"):
        (folder / tool).symlink_to(shutil.which(tool))
    for name, body in tools.items():
        (folder / name).write_text("#!/bin/sh\n" + body)
        (folder / name).chmod(0o755)
    return folder


def _make_image(folder: Path, *variables: str) -> subprocess.CompletedProcess:
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    env = {"PATH": str(folder), "HOME": str(folder)}
    return subprocess.run(
        [make, "-s", "-C", str(ROOT), "image", *variables],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_make_image_without_a_working_builder_says_why(tmp_path):
    failing = (
        'echo "Client: Docker Engine"; echo "Server:"\n'
        'echo "Cannot connect to the Docker daemon at unix:///var/run/docker.sock." >&2; exit 1\n'
    )
    done = _make_image(_fake_bin(tmp_path, {"docker": failing}))
    assert done.returncode != 0
    assert "docker is installed but cannot build" in done.stderr
    assert "Cannot connect to the Docker daemon" in done.stderr
    assert "start the docker daemon" in done.stderr.lower() and "podman" in done.stderr

    done = _make_image(_fake_bin(tmp_path / "none", {}))
    assert done.returncode != 0
    assert "neither docker nor podman is on PATH" in done.stderr
    assert "Install podman" in done.stderr


def test_make_image_builds_with_the_builder_that_works(tmp_path):
    log = tmp_path / "calls"
    podman = f'echo "$@" >> {log}\n'
    failing_docker = 'echo "permission denied while trying to connect" >&2; exit 1\n'
    folder = _fake_bin(tmp_path, {"docker": failing_docker, "podman": podman})
    done = _make_image(folder, "VARIANT=cuda", "IMAGE=reg.example/fcpts:9", "PUSH=1")
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "info",
        "build -f components/Dockerfile --build-arg VARIANT=cuda -t reg.example/fcpts:9-cuda .",
        "push reg.example/fcpts:9-cuda",
    ]
    log.unlink()
    assert _make_image(folder).returncode == 0  # the default tag: components.IMAGE, CPU
    assert log.read_text().splitlines()[1].endswith(f"VARIANT=cpu -t {IMAGE} .")


@pytest.mark.skipif(shutil.which("docker") is None, reason="no docker CLI here")
@pytest.mark.skipif(shutil.which("podman") is not None, reason="podman would build here")
def test_make_image_here_where_the_daemon_is_absent():
    """This machine's real docker CLI: without a daemon the target fails and says so."""
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0:
        pytest.skip("docker works here: make image would build the image")
    make = shutil.which("make") or pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in ("FCPTS_IMAGE", "BUILDER")}
    done = subprocess.run(
        [make, "-s", "-C", str(ROOT), "image"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "docker is installed but cannot build" in done.stderr
    assert "is not built" in done.stderr


def test_the_image_installs_the_lock_and_its_user_owns_the_cache():
    text = (ROOT / "components" / "Dockerfile").read_text()
    assert "XDG_CACHE_HOME=/opt/fcpts/cache" in text
    assert "chown -R 1000:0 /opt/fcpts/cache" in text and text.rstrip().endswith("USER 1000")
    assert k8s.CHECKPOINT_MOUNT in text
    assert "pip install --no-deps ." in text  # fcpts itself adds nothing unpinned
    cpu = (ROOT / "components" / "requirements.lock").read_text().splitlines()
    cuda = (ROOT / "components" / "requirements-cuda.lock").read_text().splitlines()
    pins = [line for line in cpu if line and not line.startswith(("#", "--"))]
    assert pins and all("==" in line and ";" not in line for line in pins)
    import kfp
    import torch

    assert f"kfp=={kfp.__version__}" in pins
    base = torch.__version__.split("+")[0]
    assert (
        f"torch=={base}+cpu" in cpu
        and "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    )
    assert f"torch=={base}" in cuda and not any(line.startswith("--") for line in cuda)
    names = {line.split("==")[0] for line in pins}
    assert {"mlflow", "kfp-kubernetes", "optuna", "psycopg2-binary"} <= names
    assert not {"pytest", "ruff", "moto", "fcpts"} & names  # runtime only


def test_the_lock_matches_the_installed_packages():
    """`make lock` regenerates the locks; a dependency added or a range changed without it
    fails here (a newer release on the index does not: the image installs the lock)."""
    done = subprocess.run(
        [sys.executable, "-m", "components.lock", "--check"],
        cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
