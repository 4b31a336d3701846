"""Which task a model and its data make (and why), and whether the data fits the model.

``--task auto`` takes the demo's task, ``encoder`` for a Hugging Face model, ``classifier``
for labelled data, and otherwise looks at the model's output on one batch: a
``(batch, C)`` float output with ``C >= 2`` is class scores (a classifier, scored by
agreement with the dense model's predictions); any other output is compared by relative MSE.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..tasks import CausalLMTask, ClassifierTask, EncoderTask, Task, is_causal_lm, to_device
from .files import first_line
from .models import ResolvedModel
from .spec import TASKS
from .splits import DataSource

PROBE_SAMPLES = 2  # samples in the batch whose output --task auto looks at


@dataclass(frozen=True)
class TaskChoice:
    """A task and the reason it was chosen, in words for calibration.json and the summary:
    ``given: ...`` when the user named it, ``inferred ...`` when ``--task auto`` chose it."""

    task: Task
    reason: str

    @property
    def given(self) -> bool:
        return self.reason.startswith("given")


def make_task(kind: str) -> Task:
    if kind == "causal-lm":
        return CausalLMTask()
    if kind == "classifier":
        return ClassifierTask()
    if kind == "encoder":
        return EncoderTask()
    if kind == "regression":
        return Task()
    raise UserError(f"unknown task {kind!r}: choose one of {', '.join(TASKS)}")


def task_kind(task: Task) -> str:
    if isinstance(task, CausalLMTask):
        return "causal-lm"
    if isinstance(task, EncoderTask):
        return "encoder"
    if isinstance(task, ClassifierTask):
        return "classifier"
    return "regression"


def choose_task(kind: str, model: ResolvedModel, data: DataSource) -> TaskChoice:
    """The task for ``kind`` and why (see the module's docstring for ``auto``)."""
    if kind != "auto":
        task = make_task(kind)
        if isinstance(task, CausalLMTask) and data.kind not in ("lm-text", "demo"):
            raise UserError(
                "--task causal-lm needs text data: give a text file and a Hugging Face decoder"
            )
        if isinstance(task, EncoderTask) and data.kind not in ("text", "demo"):
            raise UserError(
                "--task encoder needs tokenized text data: give a text file and a Hugging Face model"
            )
        return TaskChoice(task, f"given: --task {kind}")
    if model.demo is not None:
        return TaskChoice(model.demo.task, f"inferred: the task of the demo {model.source}")
    if model.kind == "huggingface" and is_causal_lm(model.model):
        return TaskChoice(
            CausalLMTask(), "inferred: a Hugging Face decoder gives next-token predictions"
        )
    if model.kind == "huggingface":
        return TaskChoice(
            EncoderTask(), "inferred: a Hugging Face model gives mean-pooled embeddings"
        )
    if data.has_labels:
        return TaskChoice(ClassifierTask(), f"inferred: the data {data.source} has class labels")
    return _inferred(model, data)


def evaluation_task(
    kind: str, model: ResolvedModel, data: DataSource, manifest: Mapping[str, Any]
) -> TaskChoice:
    """The task evaluation scores with: with ``--task auto``, the one the sparse model's
    ``manifest`` was calibrated for (and its reason); else :func:`choose_task`'s."""
    if kind == "auto" and manifest.get("task"):
        reason = manifest.get("task_reason") or "inferred at calibration"
        return TaskChoice(make_task(manifest["task"]), reason)
    return choose_task(kind, model, data)


def resolve_task(kind: str, model: ResolvedModel, data: DataSource) -> Task:
    """The task for ``kind`` (see :func:`choose_task`)."""
    return choose_task(kind, model, data).task


def _inferred(model: ResolvedModel, data: DataSource) -> TaskChoice:
    """Classifier or regression for unlabelled data, from the model's output on one batch."""
    batch = data.split("calibration", PROBE_SAMPLES, PROBE_SAMPLES)[0]
    device = next((p.device for p in model.model.parameters()), torch.device("cpu"))
    out = _forward(model.model, Task(), to_device(batch, device), data)
    shape = "(batch, " + ", ".join(str(d) for d in out.shape[1:]) + ")"
    if out.dim() == 2 and out.shape[1] >= 2 and out.dtype.is_floating_point:
        return TaskChoice(
            ClassifierTask(),
            f"inferred from the model's {shape} output; pass --task regression if these "
            "are not class scores",
        )
    return TaskChoice(
        Task(),
        f"inferred from the model's {shape} output, which is not a vector of class scores, "
        "and unlabelled data: outputs compared by relative MSE",
    )


@torch.no_grad()
def _forward(model: nn.Module, task: Task, batch: Any, data: DataSource) -> torch.Tensor:
    try:
        raw = task.run(model, batch)
        out = task.output(raw, batch)
    except Exception as exc:
        raise UserError(
            f"the data {data.source} does not fit the model (batch {_batch_shapes(batch)}): "
            f"{first_line(exc)}"
        ) from None
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"the model returned {type(out).__name__}, not a tensor, on data {data.source}"
        )
    return out


def check_fit(model: nn.Module, task: Task, batch: Any, data: DataSource) -> None:
    """One forward pass on one batch: a clear UserError when data and model don't fit
    (for a classifier also when a label of the data set is not one of its classes)."""
    out = _forward(model, task, batch, data)
    if isinstance(task, ClassifierTask):
        if out.dim() != 2:
            raise UserError(
                f"a classifier must return (batch, classes) logits; the model returned shape {tuple(out.shape)}: "
                "use --task regression"
            )
        check_labels(data, int(out.shape[1]), [batch])


def check_labels(data: DataSource, classes: int, batches: Iterable[Any] = ()) -> None:
    """A UserError naming the data and the label when a label of the data set (or of
    ``batches``) is negative or not below ``classes``, the model's number of outputs."""
    ranges = [data.label_range] if data.label_range else []
    for batch in batches:
        if isinstance(batch, Mapping) and "y" in batch and batch["y"].numel():
            ranges.append((int(batch["y"].min()), int(batch["y"].max())))
    if not ranges:
        return
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    fits = f"a model with {classes} outputs takes labels 0 to {classes - 1}"
    if low < 0:
        raise UserError(f"label {low} in {data.source} is negative: {fits}")
    if high >= classes:
        raise UserError(
            f"label {high} in {data.source} is out of range for a model with {classes} outputs "
            f"(labels 0 to {classes - 1})"
        )


def _batch_shapes(batch: Any) -> str:
    if isinstance(batch, Mapping):
        return ", ".join(
            f"{k} {tuple(v.shape)}" for k, v in batch.items() if isinstance(v, torch.Tensor)
        )
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    return type(batch).__name__
