"""The one-call entry point: a model, a task and calibration batches in, an allocation out."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn

from .alloc import Allocation, Allocator, Problem, get_allocator
from .alloc.base import Callback
from .checkpoint import CheckpointConfig, Checkpointer
from .errors import UserError
from .landing import check_feasible, check_target, zero_counts
from .layers import LayerSpec, find_prunable
from .scores import check_score, collect_input_norms, compute_scores, needs_activations
from .settings import Opt
from .tasks import Task, to_device


@dataclass(frozen=True)
class LayerSelection:
    """Which layers are prunable and within which bounds (see :func:`find_prunable`)."""

    include: Annotated[
        tuple[str, ...], Opt("prune only matching layers", metavar="PATTERN", kfp=False)
    ] = ()
    exclude: Annotated[
        tuple[str, ...],
        Opt(
            "leave matching layers out entirely (they do not count towards the target)",
            metavar="PATTERN",
            kfp=False,
        ),
    ] = ()
    keep_dense: Annotated[
        tuple[str, ...],
        Opt(
            "keep matching layers dense (they count towards the target)",
            metavar="PATTERN",
            kfp=False,
        ),
    ] = ()
    bounds: Annotated[
        Mapping[str, tuple[float, float]],
        Opt(
            "per-layer sparsity bounds for matching layers, e.g. 'classifier.*=0:0.5'",
            metavar="PATTERN=MIN:MAX",
            kfp=False,
        ),
    ] = field(default_factory=dict)
    min_sparsity: Annotated[float, Opt("lowest sparsity of any layer", metavar="S", kfp=False)] = (
        0.0
    )
    max_sparsity: Annotated[float, Opt("highest sparsity of any layer", metavar="S", kfp=False)] = (
        1.0
    )

    def find(self, model: nn.Module) -> list[LayerSpec]:
        return find_prunable(
            model,
            include=self.include or None,
            exclude=self.exclude,
            keep_dense=self.keep_dense,
            bounds=self.bounds,
            min_sparsity=self.min_sparsity,
            max_sparsity=self.max_sparsity,
        )


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else must exist."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(
            f"--device {device!r} is not a torch device: use auto, cpu or cuda[:N]"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"--device {device} asked for CUDA but no CUDA GPU is visible: use --device cpu"
        )
    return dev


def _weights(model: nn.Module, layers: Sequence[LayerSpec]) -> dict[str, torch.Tensor]:
    return {layer.name: model.get_submodule(layer.name).weight.detach() for layer in layers}


def sparsify(
    model: nn.Module,
    target: float,
    method: str = "fcpts",
    score: str = "auto",
    task: Task | None = None,
    batches: Sequence[Any] | None = None,
    selection: LayerSelection | None = None,
    settings: Mapping[str, Any] | None = None,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "auto",
    callback: Callback | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    resume: bool = False,
) -> Allocation:
    """Allocate ``target`` sparsity over the prunable layers of ``model``.

    ``score="auto"`` means wanda when a task and calibration batches are given, else
    magnitude. Returns masks and figures; the model itself is not modified (use
    :func:`fcpts.sparse_model.apply_allocation`). Activation-aware scores and the learned
    method need ``task`` and calibration ``batches``.

    With ``checkpoint_dir`` the learned method saves its whole state there every
    ``checkpoint_every`` iterations (and after the last); with ``resume=True`` it continues
    from that checkpoint, and the result equals an uninterrupted run's. A checkpoint of a
    run with other inputs is refused (see :mod:`fcpts.checkpoint`). The other methods
    finish in one step and ignore these arguments.
    """
    allocator, problem = build_problem(
        model,
        target,
        method=method,
        score=score,
        task=task,
        batches=batches,
        selection=selection,
        settings=settings,
        input_norms=input_norms,
        device=device,
        callback=callback,
        progress=progress,
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        resume=resume,
    )
    allocation = allocator.allocate(problem)
    allocation.settings = dict(allocation.settings, device=str(problem.device))
    return allocation


def build_problem(
    model: nn.Module,
    target: float,
    method: str = "fcpts",
    score: str = "auto",
    task: Task | None = None,
    batches: Sequence[Any] | None = None,
    selection: LayerSelection | None = None,
    settings: Mapping[str, Any] | None = None,
    input_norms: Mapping[str, torch.Tensor] | None = None,
    device: str | torch.device = "auto",
    callback: Callback | None = None,
    progress: bool = False,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    resume: bool = False,
) -> tuple[Allocator, Problem]:
    """The allocator and the problem :func:`sparsify` solves (arguments as there)."""
    target = check_target(target)
    checkpointer = None
    if checkpoint_dir is not None:
        checkpointer = Checkpointer(
            CheckpointConfig(Path(checkpoint_dir), checkpoint_every, resume)
        )
    elif resume:
        raise UserError(
            "resume needs checkpoint_dir: the folder the interrupted run checkpointed to"
        )
    if score == "auto":
        # the benchmark's best variant: activation-aware scores whenever data is at hand
        score = "wanda" if task is not None and batches else "magnitude"
    check_score(score)
    allocator = get_allocator(method, **dict(settings or {}))
    selection = selection or LayerSelection()
    layers = selection.find(model)
    check_feasible(target, layers, zero_counts(_weights(model, layers)))
    dev = resolve_device(device)
    if batches is not None and len(batches) == 0:
        raise UserError("the calibration set is empty: give at least one calibration sample")
    if needs_activations(score) and input_norms is None:
        if task is None or not batches:
            raise UserError("the wanda score needs calibration data: give --data")
        model_dev = model.to(dev).eval()
        input_norms = collect_input_norms(
            model_dev, layers, [to_device(b, dev) for b in batches], task.run
        )
    weights = _weights(model, layers)
    scores = compute_scores(weights, layers, score, input_norms)
    problem = Problem(
        layers=layers,
        weights=weights,
        scores=scores,
        target=target,
        score_kind=score,
        model=model,
        task=task,
        batches=batches,
        device=dev,
        callback=callback,
        progress=progress,
        checkpoint=checkpointer,
    )
    return allocator, problem
