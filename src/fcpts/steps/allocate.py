"""Step 2, allocate: run an allocator from the registry on a calibration artifact.

Writes the sparse model in its source's own format (a Hugging Face or sentence-transformers
folder, a TorchScript file, or ``model.safetensors`` holding the state_dict under the
source model's own parameter names; :mod:`fcpts.export.folder`), ``model.onnx`` and
``manifest.json`` (target, achieved sparsity, zeros,
prunable, method, score, per-layer figures, plus where the model and the calibration
data came from, so evaluation can reload the dense model and stay disjoint).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..alloc import Allocation, get_allocator
from ..alloc.base import Callback
from ..alloc.structured import parse_structure
from ..checkpoint import FILE_NAME
from ..core import LayerSelection, sparsify
from ..errors import UserError
from ..export.folder import SourceFormat
from ..metrics import recalibrate_batchnorm
from ..scores import needs_activations
from ..sources import ResolvedModel, layer_view, make_task, resolve_model
from ..sparse_model import apply_allocation, manifest, read_manifest, save_sparse
from ..structured import shrink_to, sparsify_nm
from ..tasks import to_device
from . import blockwise as bw
from .calibrate import Calibration, load_calibration
from .common import (
    checkpoint_folder,
    move,
    resolve_score,
    selection_from_dict,
    selection_to_dict,
    write_output,
)
from .progress import Progress, progress_mode
from .tracked import RECORD_KEY, LiveRun, Tracking, failure_recorded, finish_step, log_allocation

HISTORY_POINTS = 50
CURVE_BATCH = 50  # allocator iterations per request of curve points (or every 10 s)


@dataclass
class Allocated:
    """The sparse model folder, its manifest and the allocation behind it."""

    path: Path
    manifest: dict[str, Any]
    allocation: Allocation


def allocate(
    calibration: str | os.PathLike | Calibration,
    out_dir: str | os.PathLike,
    *,
    target: float,
    method: str = "fcpts",
    structure: str = "unstructured",
    budget: str = "params",
    refit: bool = True,
    unit_multiple: int = 8,
    score: str | None = None,
    settings: Mapping[str, Any] | None = None,
    selection: LayerSelection | Mapping[str, Any] | None = None,
    seed: int = 0,
    device: str = "auto",
    recalibrate_bn: bool = False,
    save: str = "dense",
    blockwise: str = "off",
    memory_mb: int | None = None,
    progress: str = "auto",
    log_every: int = 0,
    resolved: ResolvedModel | None = None,
    callback: Callback | None = None,
    tracking: Tracking | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 25,
    resume: bool = False,
) -> Allocated:
    """Allocate ``target`` sparsity with ``method`` and save the sparse model to ``out_dir``.

    ``score`` defaults (``None`` or ``auto``) to the one the calibration was made for, ``selection`` to the
    calibration's layer selection (a mapping overrides only the fields it names),
    ``settings`` to the allocator's library defaults
    (for fcpts, ``seed`` fills its ``seed`` setting unless given). ``recalibrate_bn``
    re-estimates BatchNorm statistics of the sparse model on the calibration batches.
    ``save`` is ``dense`` (the folder in the source's own format plus ``model.onnx``) or
    ``compressed`` (bitmask+values weights; see :func:`fcpts.sparse_model.save_sparse`).
    ``progress`` shows the learned method's iterations (a bar on a terminal, else plain
    ``[fcpts] allocate: ...`` lines; see :class:`~fcpts.steps.progress.Progress`);
    ``log_every`` > 0 adds a line every that many iterations. ``tracking`` sends the
    allocator's per-iteration loss and global sparsity to the pipeline's MLflow run while
    it runs, then the params, the manifest and the per-layer chart
    (:mod:`fcpts.steps.tracked`).

    ``out_dir`` (a folder or ``s3://bucket/prefix``) is written whole or not at all
    (:func:`fcpts.steps.common.write_output`); ``calibration`` may be an ``s3://`` output.
    The fcpts method checkpoints every ``checkpoint_every`` iterations into
    ``checkpoint_dir`` (default :func:`~fcpts.steps.common.checkpoint_folder`: ``<out>.checkpoint``
    next to a local output); ``resume=True`` continues from the checkpoint there (none:
    starts afresh). The checkpoint is deleted once the output is written.

    ``structure`` ``units`` writes the smaller dense model (``budget``: what ``target`` is
    a fraction of; ``refit``: least-squares refit of the removed units' consumers), ``N:M``
    N:M masks (see :mod:`fcpts.structured`); neither checkpoints.
    """
    start = time.perf_counter()
    if save not in ("dense", "compressed"):
        raise UserError(f"--save must be dense or compressed, got {save!r}")
    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    checkpoint = Path(checkpoint_dir) if checkpoint_dir else checkpoint_folder(out_dir)
    work = functools.partial(
        _written,
        cal,
        out_dir,
        checkpoint,
        checkpoint_every=checkpoint_every,
        resume=resume,
        target=target,
        method=method,
        structure=structure,
        budget=budget,
        refit=refit,
        unit_multiple=unit_multiple,
        score=score,
        settings=settings,
        selection=selection,
        seed=seed,
        device=device,
        recalibrate_bn=recalibrate_bn,
        save=save,
        blockwise=blockwise,
        memory_mb=memory_mb,
        progress=progress,
        log_every=log_every,
        resolved=resolved,
        start=start,
    )
    if tracking is None:
        return work(callback=callback, tracking=None)
    tracking = tracking.resolve(cal.info)
    live = LiveRun(tracking, "allocate", every=CURVE_BATCH)  # cannot fail the step
    with failure_recorded(tracking, "allocate", live.quick):
        result = work(callback=_chain(live.curves, callback), tracking=tracking)
    run = live.open()  # the output is on disk: now tracking may fail the step
    log_allocation(run, result.path)
    finish_step(run, "allocate", result.manifest["step_seconds"])
    return result


def _written(
    cal: Calibration,
    out_dir: str | os.PathLike,
    checkpoint: Path,
    **kwargs: Any,
) -> Allocated:
    """:func:`_allocate` into a staged folder published to ``out_dir``; the checkpoint is
    removed once the output is whole (a failed step keeps it for ``resume``)."""
    result, local = write_output(
        out_dir, lambda folder: _allocate(cal, folder, checkpoint, **kwargs)
    )
    result.path = local
    (checkpoint / FILE_NAME).unlink(missing_ok=True)
    bw.free_work(checkpoint)
    with contextlib.suppress(OSError):
        checkpoint.rmdir()  # only when empty: a --checkpoint-dir may hold other files
    return result


def _chain(first: Callback, second: Callback | None) -> Callback:
    if second is None:
        return first

    def callback(iteration: int, record: dict[str, float]) -> None:
        first(iteration, record)
        second(iteration, record)

    return callback


def _allocate(
    cal: Calibration,
    out_dir: str | os.PathLike,
    checkpoint: Path,
    *,
    checkpoint_every: int,
    resume: bool,
    target: float,
    method: str,
    structure: str,
    budget: str,
    refit: bool,
    unit_multiple: int,
    score: str | None,
    settings: Mapping[str, Any] | None,
    selection: LayerSelection | Mapping[str, Any] | None,
    seed: int,
    device: str,
    recalibrate_bn: bool,
    save: str,
    blockwise: str,
    memory_mb: int | None,
    progress: str,
    log_every: int,
    resolved: ResolvedModel | None,
    callback: Callback | None,
    tracking: Tracking | None,
    start: float,
) -> Allocated:
    info = cal.info
    score = resolve_score(score, default=info["score"])
    model = resolved or resolve_model(info["sources"]["model"], info["sources"].get("weights"))
    if model.digest() != info["model"]["sha256"]:
        raise UserError(
            f"the model {model.source} is not the one calibrated in {cal.path} (weights differ): "
            "rerun calibrate with this model"
        )
    task = make_task(info["task"])
    if not isinstance(selection, LayerSelection):
        selection = selection_from_dict(selection, base=selection_from_dict(info["selection"]))
    norms = cal.input_norms
    if needs_activations(score):
        if norms is None:
            raise UserError(
                f"score {score} needs the input statistics that calibration records for "
                "activation-aware scores: rerun calibrate with --score wanda"
            )
        missing = [
            layer.name for layer in selection.find(layer_view(model)) if layer.name not in norms
        ]
        if missing:
            raise UserError(
                f"the calibration has no input statistics for layers {missing[:3]}: "
                "rerun calibrate with the same --include/--exclude"
            )
    settings = dict(settings or {})
    if method == "fcpts":
        settings.setdefault("seed", int(seed))
        if model.scripted:
            raise UserError(
                "the fcpts method learns through the model's forward pass, which TorchScript "
                "does not allow: use --method uniform/global/erk/owl, or give module:function --weights"
            )
    mode = progress_mode(progress)
    total = getattr(get_allocator(method, **settings).config, "iters", None)
    shown = Progress("allocate", total, "iterations", mode, every=max(0, int(log_every or 0)))
    callback = shown.callback(callback)
    if resume and method == "fcpts" and (checkpoint / FILE_NAME).is_file():
        print(f"[fcpts] resuming from the checkpoint {checkpoint / FILE_NAME}", flush=True)
    torch.manual_seed(int(seed))
    kind, n, m = parse_structure(structure)
    if int(unit_multiple) < 1:
        raise UserError(f"--unit-multiple must be >= 1 (e.g. 8), got {unit_multiple}")
    if budget != "params" and kind != "units":
        raise UserError(
            f"--budget {budget} needs --structure units (weights are counted in params)"
        )
    common = dict(
        method=method,
        score=score,
        task=task,
        batches=cal.batches,
        selection=selection,
        settings=settings,
        input_norms=norms,
        device=device,
        callback=callback,
        progress=mode == "bar",
    )
    structured: dict[str, Any] = {}
    cfg = bw.picked(
        blockwise, memory_mb, model, settings, method, structure, save, score, selection
    )
    if cfg is not None:
        allocation, sparse, section = bw.allocate(
            model, cal.batches, checkpoint, cfg, target, selection, resume, resolved is None
        )
        kind, structured = "blockwise", {"blockwise_run": section}
    elif kind == "units":
        shrunk = shrink_to(
            layer_view(model),
            target,
            budget=budget,
            refit=refit,
            unit_multiple=unit_multiple,
            **common,
        )
        allocation = shrunk.as_allocation(target)
        structured = {"structure": shrunk.section(), "units": shrunk.manifest_units()}
        sparse = shrunk.model
    elif kind == "nm":
        allocation, chosen = sparsify_nm(layer_view(model), target, n, m, **common)
        structured = {"structure": _nm_section(structure, allocation, chosen)}
    else:
        allocation = sparsify(
            layer_view(model),
            target,
            checkpoint_dir=checkpoint,
            checkpoint_every=checkpoint_every,
            resume=resume,
            **common,
        )
    shown.close()
    if kind != "blockwise":
        move(model.model, "cpu")
    if kind not in ("units", "blockwise"):
        sparse = _apply(model, allocation)
    recalibrated = 0
    if recalibrate_bn:
        recalibrated = recalibrate_batchnorm(sparse, task, cal.batches)
    extra = {
        "sources": info["sources"],
        "dense_model_sha256": info["model"]["sha256"],
        "task": info["task"],
        "task_reason": info.get("task_reason"),
        "seed": int(seed),
        "selection": selection_to_dict(selection),
        "calibration": {
            "data": info["data"],
            "split": info["split"],
            "seed": info["seed"],
            "samples": info["samples"],
            "batch_size": info["batch_size"],
            "tensors_sha256": info["tensors_sha256"],
            "sample_digests": info["sample_digests"],
        },
        "recalibrated_batchnorm_layers": recalibrated,
        "blockwise": "on" if kind == "blockwise" else "off",
        "iterations": len(allocation.history),
        "history": _thin(allocation.history),
        "step_seconds": None,
        **structured,
    }
    if tracking is not None:
        extra[RECORD_KEY] = tracking.record()
    data = manifest(allocation, extra)
    data["step_seconds"] = round(time.perf_counter() - start, 3)
    path = save_sparse(
        sparse,
        data,
        out_dir,
        source=SourceFormat(
            folder=model.folder, tokenizer=model.tokenizer, reshaped=kind == "units"
        ),
        compressed=save == "compressed",
        example=task.split(to_device(cal.batches[0], "cpu")),
    )
    return Allocated(path=path, manifest=read_manifest(path), allocation=allocation)


def _apply(model: ResolvedModel, allocation: Allocation):
    """The sparse copy of the model. TorchScript modules have no get_submodule, which
    apply_allocation uses: their pruned weights are masked through named_parameters."""
    if not model.scripted:
        return apply_allocation(model.model, allocation)
    sparse = copy.deepcopy(model.model)
    params = dict(sparse.named_parameters())
    with torch.no_grad():
        for layer in allocation.layers:
            weight = params[f"{layer.name}.weight"]
            weight.masked_fill_(~allocation.masks[layer.name].to(weight.device), 0)
    return sparse


def _nm_section(structure: str, allocation: Allocation, chosen: list[str]) -> dict[str, Any]:
    return {
        "structure": structure,
        "target": allocation.target,
        "achieved": allocation.achieved,
        "nm_layers": chosen,
        "dense_layers": [r.name for r in allocation.layers if r.name not in set(chosen)],
    }


def _thin(history: list[dict[str, float]]) -> list[dict[str, float]]:
    """At most HISTORY_POINTS records, evenly spaced, the last one always kept."""
    if len(history) <= HISTORY_POINTS:
        return [dict(h, iteration=i) for i, h in enumerate(history)]
    step = len(history) / HISTORY_POINTS
    idx = sorted({int(i * step) for i in range(HISTORY_POINTS)} | {len(history) - 1})
    return [dict(history[i], iteration=i) for i in idx]
