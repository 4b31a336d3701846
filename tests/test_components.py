"""The KFP components, the compiled pipeline YAML and the components' Dockerfile."""

import shlex
import tomllib

import pytest
import yaml
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from fcpts import __version__
from fcpts.cli import load_pipeline_module, main

STEPS = ("calibrate", "allocate", "evaluate", "register")


@pytest.fixture(scope="module")
def pipeline_module():
    return load_pipeline_module()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    assert main(["compile", "--out", str(out)]) == 0
    return next(yaml.safe_load_all(out.read_text()))  # then the Kubernetes platform spec


def test_image_is_defined_once_and_versioned():
    from components import IMAGE

    assert IMAGE == f"ghcr.io/fcpts/fcpts:{__version__}"
    builder = (REPO_ROOT / "components" / "build.py").read_text()
    assert "base_image=IMAGE" in builder and "install_kfp_package=False" in builder
    for step in STEPS:
        source = (REPO_ROOT / "components" / step / "component.py").read_text()
        assert f'component("{step}")' in source and "ghcr.io" not in source


def _artifact_types(spec, kind):
    defs = getattr(spec, kind) or {}
    return {name: d.type for name, d in defs.items()}


def test_components_have_typed_artifacts(pipeline_module):
    from components.allocate.component import allocate
    from components.calibrate.component import calibrate
    from components.evaluate.component import evaluate
    from components.register.component import register

    specs = {c.name: c.component_spec for c in (calibrate, allocate, evaluate, register)}
    assert _artifact_types(specs["calibrate"], "outputs") == {"calibration": "system.Dataset@0.0.1"}
    assert _artifact_types(specs["allocate"], "inputs")["calibration"] == "system.Dataset@0.0.1"
    assert _artifact_types(specs["allocate"], "outputs") == {"sparse_model": "system.Model@0.0.1"}
    ev_out = _artifact_types(specs["evaluate"], "outputs")
    assert ev_out["metrics"] == "system.Metrics@0.0.1"
    assert ev_out["report"] == "system.Markdown@0.0.1"
    assert ev_out["report_html"] == "system.HTML@0.0.1"
    assert ev_out["Output"] == "Boolean"  # the gate, read by the pipeline's dsl.If
    reg_in = _artifact_types(specs["register"], "inputs")
    assert (
        reg_in["sparse_model"] == "system.Model@0.0.1"
        and reg_in["metrics"] == "system.Metrics@0.0.1"
    )
    for spec in specs.values():
        container = spec.implementation.container
        assert container.image == f"ghcr.io/fcpts/fcpts:{__version__}"
        command = " ".join(container.command)
        assert "pip install" not in command  # install_kfp_package=False: the image has kfp
        # heavy imports happen inside the function, at run time in the image
        assert "from fcpts.steps.entry import run" in command


def test_compiled_pipeline_structure(compiled):
    root = compiled["root"]["dag"]["tasks"]
    assert set(root) == {"calibrate", "allocate", "evaluate", "condition-1"}
    assert "dependentTasks" not in root["calibrate"]
    assert root["allocate"]["dependentTasks"] == ["calibrate"]
    assert root["evaluate"]["dependentTasks"] == ["allocate"]
    condition = root["condition-1"]
    assert condition["taskInfo"]["name"] == "approved"
    assert "evaluate" in condition["dependentTasks"]
    assert condition["triggerPolicy"]["condition"] == (
        "inputs.parameter_values['pipelinechannel--evaluate-Output'] == true"
    )
    inner = compiled["components"]["comp-condition-1"]["dag"]["tasks"]
    assert set(inner) == {"register"}
    assert inner["register"]["componentRef"]["name"] == "comp-register"

    tasks = {**root, **inner}
    retries = {step: tasks[step]["retryPolicy"]["maxRetryCount"] for step in STEPS}
    assert retries == {"calibrate": 2, "allocate": 1, "evaluate": 2, "register": 3}
    assert all(tasks[s]["retryPolicy"]["backoffDuration"] == "30s" for s in STEPS)
    caching = {
        step: tasks[step].get("cachingOptions", {}).get("enableCache", False) for step in STEPS
    }
    assert caching == {"calibrate": True, "allocate": True, "evaluate": False, "register": False}

    executors = compiled["deploymentSpec"]["executors"]
    assert set(executors) == {f"exec-{s}" for s in STEPS}
    for step in STEPS:
        container = executors[f"exec-{step}"]["container"]
        assert container["image"] == f"ghcr.io/fcpts/fcpts:{__version__}"
        res = container["resources"]
        for key in (
            "resourceCpuRequest",
            "resourceCpuLimit",
            "resourceMemoryRequest",
            "resourceMemoryLimit",
        ):
            assert res[key], (step, key)
    assert executors["exec-allocate"]["container"]["resources"]["resourceMemoryRequest"] == "8G"
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert params["model"]["defaultValue"] == "demo:minilm"
    assert params["target"]["defaultValue"] == 0.5
    assert params["method"]["defaultValue"] == "fcpts"


def test_local_build_drops_retries_only(pipeline_module, tmp_path):
    from kfp import compiler

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(pipeline_module.build(retries=False), str(out))
    tasks = next(yaml.safe_load_all(out.read_text()))["root"]["dag"]["tasks"]
    assert (
        "retryPolicy" not in tasks["calibrate"]
        and tasks["calibrate"]["cachingOptions"]["enableCache"]
    )


def _dockerfile_instructions():
    lines, current = [], ""
    for raw in (REPO_ROOT / "components" / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        current += " " + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(current.strip())
            current = ""
    assert not current, "a continued line never ends"
    return lines


def _pip_installs(instructions):
    """The arguments of every pip install in the RUN instructions."""
    for ins in instructions:
        if not ins.startswith("RUN "):
            continue
        commands, current = [], []
        for word in shlex.split(ins[4:]):
            if word in ("&&", ";", "||"):
                commands.append(current)
                current = []
            else:
                current.append(word)
        commands.append(current)
        for words in commands:
            plain = len(words) >= 2 and words[0] in ("pip", "pip3") and words[1] == "install"
            if plain or words[:4] == ["python", "-m", "pip", "install"]:
                yield words[words.index("install") + 1 :]


def test_dockerfile_parses_and_matches_pyproject():
    instructions = _dockerfile_instructions()
    known = {
        "FROM",
        "RUN",
        "COPY",
        "ENV",
        "WORKDIR",
        "USER",
        "ARG",
        "LABEL",
        "ENTRYPOINT",
        "CMD",
        "EXPOSE",
    }
    assert instructions[0].startswith("FROM ")
    assert instructions[0].split()[1].startswith("python:3.11")
    for ins in instructions:
        assert ins.split()[0] in known, ins

    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    extras = pyproject["optional-dependencies"]

    installs = list(_pip_installs(instructions))
    assert len(installs) == 2
    lock_args, project_args = installs
    # the pinned lock of the variant first (CPU or CUDA torch), then fcpts from the copied
    # source adding nothing unpinned; every requirement of pyproject the image needs is
    # pinned in both locks to a version pyproject accepts
    assert lock_args == ["-r", "$lock"] and project_args == ["--no-deps", "."]
    from components.lock import EXTRAS, LOCKS

    assert "pipeline" in EXTRAS and set(EXTRAS) <= set(extras)
    for lock in LOCKS.values():
        assert any(ins.startswith("COPY ") and lock.name in ins for ins in instructions)
        lines = [x for x in lock.read_text().splitlines() if x and not x.startswith(("#", "--"))]
        pins = {canonicalize_name(x.split("==")[0]): x.split("==")[1] for x in lines}
        for text in [*pyproject["dependencies"], *(d for e in EXTRAS for d in extras[e])]:
            req = Requirement(text)
            version = pins[canonicalize_name(req.name)]
            assert req.specifier.contains(version.split("+")[0], prereleases=True), (lock, text)
    assert "https://download.pytorch.org/whl/cpu" in LOCKS["cpu"].read_text()
    assert any(ins.startswith("COPY pyproject.toml") for ins in instructions)
    assert any(ins.startswith("COPY src ") for ins in instructions)


def test_component_parameters_are_the_declared_options():
    """Each component takes exactly the declared options of its groups (by their public
    names, typed for KFP), described by their help; the pipelines take their union."""
    from components.build import STEPS as SPECS
    from components.build import kfp_default, parameters
    from components.evaluate.component import evaluate
    from fcpts.settings import declared
    from fcpts.steps.options import EvaluationOptions, GateOptions
    from pipelines.sparsify import sparsify_pipeline

    inputs = evaluate.component_spec.inputs
    for setting in [*declared(EvaluationOptions), *declared(GateOptions)]:
        spec = inputs[setting.dest]
        assert spec.description == " ".join(setting.opt.help.split())
        assert spec.default == kfp_default(setting)
    assert inputs["evaluation_samples"].type == "Integer"  # optional int: 0 = not given
    pipeline_inputs = set(sparsify_pipeline.component_spec.inputs)
    union = {s.dest for step in SPECS.values() for s in parameters(step)}
    assert pipeline_inputs == union


@pytest.mark.parametrize("step", STEPS)
def test_component_readmes_are_generated(step):
    from components.build import readme

    path = REPO_ROOT / "components" / step / "README.md"
    assert path.read_text() == readme(step), f"{path} is stale: run `make docs`"
