"""Build the KFP components from the steps' declared options.

A lightweight KFP component is a Python function whose source KFP embeds in the pipeline
and runs in the image; its parameters are the component's inputs. Here each component's
function is generated from the declarations (``fcpts.steps.options``, ``fcpts.sources.Sources``):
one parameter per declared option that KFP should see, named by its public name
(``calibration_samples``), typed for KFP (an optional int is an ``int`` whose 0 means
"not given", an optional string a ``str`` whose "" does), with the option's help as its
description. The body is always ``return run("<step>", dict(locals()))``
(:func:`fcpts.steps.entry.run`), so no parameter list is typed twice. A README per
component is generated from the same declarations (:func:`readme`).
"""

from __future__ import annotations

import linecache
import textwrap
from dataclasses import dataclass, field
from typing import Any

from kfp import dsl

from fcpts.settings import Declared, declared
from fcpts.sources import Sources
from fcpts.steps import options as o

from . import IMAGE

KFP_RUN_ID_HELP = "the KFP run's id (the pipeline passes dsl.PIPELINE_JOB_ID_PLACEHOLDER)"


@dataclass(frozen=True)
class Step:
    """A component: its artifacts, its option groups (a group, or a group and the dests
    taken from it), whether it returns the gate, and what it does."""

    name: str
    doc: str
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    groups: tuple[Any, ...] = ()
    returns: str | None = None
    tracked: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)


STEPS = {
    "calibrate": Step(
        "calibrate",
        "Resolve the model and data sources, check they fit (one forward pass), and write the "
        "calibration artifact: batches, dense reference outputs and, for activation-aware "
        "scores, per-layer input statistics (safetensors + calibration.json).",
        outputs=(("calibration", "Dataset"),),
        groups=(Sources, o.CalibrationOptions, o.RunOptions, (o.PipelineOptions, ("selection",))),
    ),
    "allocate": Step(
        "allocate",
        "Allocate ``target`` sparsity with ``method`` and write the sparse model folder: "
        "model.safetensors (the whole state_dict) and manifest.json. The fcpts method "
        "checkpoints every 25 iterations next to the output path and resumes from there, so a "
        "retry of this step that sees the same disk continues where the killed one stopped "
        "(a retry in a new pod too when the pipeline is compiled with --checkpoint-pvc, which "
        "mounts a volume for the checkpoint; without it a retry in a new pod starts afresh).",
        inputs=(("calibration", "Dataset"),),
        outputs=(("sparse_model", "Model"),),
        groups=(
            o.AllocationOptions,
            (o.CalibrationOptions, ("score",)),
            o.PipelineOptions,
            o.RunOptions,
        ),
    ),
    "evaluate": Step(
        "evaluate",
        "Evaluate the sparse model against the dense one on the evaluation split (disjoint "
        "from calibration): task metric, sparsity counted from the weights, size on disk, "
        "CPU latency, the per-layer chart and the reports. Returns the approval gate's verdict "
        "for ``tolerance`` (the pipeline's dsl.If reads it). ``evaluation`` holds "
        "metrics.json, allocation.png, report.md and report.html.",
        inputs=(("sparse_model", "Model"),),
        outputs=(
            ("metrics", "Metrics"),
            ("report", "Markdown"),
            ("report_html", "HTML"),
            ("evaluation", "Artifact"),
        ),
        groups=(
            Sources,
            o.EvaluationOptions,
            (o.AllocationOptions, ("recalibrate_bn",)),
            o.GateOptions,
            o.RunOptions,
        ),
        returns="bool",
    ),
    "register": Step(
        "register",
        "Re-apply the approval gate (quality drop within ``tolerance``, sparsity exactly at the "
        "target), write decision.json to ``decision`` and hand an approved model to the "
        "registry (MLflow's when tracking, else ``registry``, else $FCPTS_REGISTRY, else the "
        "decision is recorded only).",
        inputs=(("sparse_model", "Model"), ("metrics", "Metrics")),
        outputs=(("decision", "Artifact"),),
        groups=(o.GateOptions, o.RegistryOptions),
    ),
}


def parameters(step: Step) -> list[Declared]:
    """The declared options a component takes, in order, each once."""
    out: dict[str, Declared] = {}
    groups = [*step.groups, *((o.TrackingOptions,) if step.tracked else ())]
    for item in groups:
        group, only = item if isinstance(item, tuple) else (item, None)
        for setting in declared(group):
            if setting.opt.kfp and (only is None or setting.dest in only):
                out.setdefault(setting.dest, setting)
    return list(out.values())


def kfp_type(setting: Declared) -> str:
    return {bool: "bool", int: "int", float: "float"}.get(setting.type, "str")


def kfp_default(setting: Declared) -> Any:
    """The parameter's default (KFP parameters cannot be None: 0 or "" stand for it)."""
    if not setting.has_default:
        return None
    if setting.default is None:
        return 0 if setting.type is int else ""
    return setting.default


def _signature(step: Step) -> str:
    required = [f"{n}: Input[{t}]" for n, t in step.inputs]
    required += [f"{n}: Output[{t}]" for n, t in step.outputs]
    optional = []
    for setting in parameters(step):
        default = kfp_default(setting)
        if default is None:
            required.append(f"{setting.dest}: {kfp_type(setting)}")
        else:
            optional.append(f"{setting.dest}: {kfp_type(setting)} = {default!r}")
    if step.tracked:
        optional.append("kfp_run_id: str = ''")
    returns = f" -> {step.returns}" if step.returns else ""
    return f"def {step.name}(\n    " + ",\n    ".join(required + optional) + f",\n){returns}:"


def source(step: Step) -> str:
    """The component function's source: signature, docstring with every parameter's help
    (KFP reads the Args section as the inputs' descriptions), and the one-line body."""
    args = [f"        {n}: input artifact ({t})" for n, t in step.inputs]
    args += [f"        {n}: output artifact ({t})" for n, t in step.outputs]
    args += [f"        {s.dest}: {' '.join(s.opt.help.split())}" for s in parameters(step)]
    if step.tracked:
        args.append(f"        kfp_run_id: {KFP_RUN_ID_HELP}")
    summary = textwrap.fill(step.doc, 92, subsequent_indent="    ")
    doc = "\n".join([summary, "", "    Args:", *args])
    return (
        f'{_signature(step)}\n    """{doc}\n    """\n'
        "    from fcpts.steps.entry import run\n\n"
        f"    return run({step.name!r}, dict(locals()))\n"
    )


def component(name: str):
    """The KFP component of step ``name``, built from its generated source."""
    step = STEPS[name]
    text = source(step)
    filename = f"<fcpts component {name}>"
    # inspect.getsource, which KFP uses to embed the function, reads it from linecache
    linecache.cache[filename] = (len(text), None, text.splitlines(True), filename)
    namespace: dict[str, Any] = {
        "__name__": f"components.{name}.component",
        **{k: getattr(dsl, k) for k in ("Input", "Output", "Dataset", "Model", "Metrics")},
        **{k: getattr(dsl, k) for k in ("Markdown", "HTML", "Artifact")},
    }
    # dont_inherit: this module's `from __future__ import annotations` would make the
    # annotations strings, which KFP cannot read
    exec(compile(text, filename, "exec", dont_inherit=True), namespace)
    return dsl.component(base_image=IMAGE, install_kfp_package=False)(namespace[name])


def readme(name: str) -> str:
    """components/<name>/README.md: what the component does and its parameters."""
    step = STEPS[name]
    rows = ["| parameter | type | default | description |", "|---|---|---|---|"]
    for n, t in step.inputs:
        rows.append(f"| `{n}` | Input[{t}] | | input artifact |")
    for n, t in step.outputs:
        rows.append(f"| `{n}` | Output[{t}] | | output artifact |")
    for s in parameters(step):
        default = kfp_default(s)
        shown = "required" if default is None else f"`{default!r}`"
        text = " ".join(s.opt.help.split()).replace("|", "\\|")
        rows.append(f"| `{s.dest}` | {kfp_type(s)} | {shown} | {text} |")
    if step.tracked:
        rows.append(f"| `kfp_run_id` | str | `''` | {KFP_RUN_ID_HELP} |")
    return (
        f"# {name}\n\n"
        "<!-- generated from the declarations by `make docs` (components/build.py); "
        "do not edit -->\n\n"
        f"{' '.join(step.doc.split())}\n\n"
        f"```python\nfrom components.{name}.component import {name}\n```\n\n"
        + "\n".join(rows)
        + "\n\nRuns in the project's image with `install_kfp_package=False`; the function body "
        "is `fcpts.steps.entry.run`, which calls the step of the same name in `fcpts.steps`.\n"
    )


if __name__ == "__main__":  # `make docs`: python -m components.build
    from pathlib import Path

    for step in STEPS:
        (Path(__file__).parent / step / "README.md").write_text(readme(step))
