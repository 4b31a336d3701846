"""Step 1, calibrate: resolve the model and the calibration data, check that they fit,
record the dense model's reference outputs and (for activation-aware scores) the input
statistics of every prunable layer.

The artifact is a folder: ``calibration.safetensors`` (the calibration batches, the
reference outputs per batch, the per-layer input-channel norms) and ``calibration.json``
(sources, sample count, shapes, sha256 digests of the model weights, of the data and of
the tensors file, and a digest of every sample so evaluation can prove it is disjoint).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import __version__
from ..core import LayerSelection, resolve_device
from ..errors import UserError
from ..scores import collect_input_norms, needs_activations
from ..sources import (
    ResolvedModel,
    Sources,
    check_fit,
    choose_task,
    layer_view,
    resolve_data,
    resolve_model,
    sample_digests,
    task_kind,
)
from ..sparse_model import sha256_file
from ..tasks import Task, to_device
from .common import (
    FILE_MODE,
    input_folder,
    move,
    positive_int,
    read_json,
    resolve_score,
    selection_from_dict,
    selection_to_dict,
    write_json,
    write_output,
)
from .progress import batch_progress
from .tracked import RECORD_KEY, Tracking, failure_recorded, log_calibration

FORMAT = "fcpts.calibration/1"
INFO_FILE = "calibration.json"
TENSORS_FILE = "calibration.safetensors"


@dataclass
class Calibration:
    """A calibration artifact, loaded: its description and its tensors."""

    path: Path
    info: dict[str, Any]
    batches: list[Any]
    reference: list[torch.Tensor]
    input_norms: dict[str, torch.Tensor] | None

    @property
    def sources(self) -> Sources:
        return Sources.from_dict(self.info["sources"])


def calibrate(
    sources: Sources,
    out_dir: str | os.PathLike,
    *,
    score: str = "auto",
    samples: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    selection: LayerSelection | Mapping[str, Any] | None = None,
    device: str = "auto",
    progress: str = "auto",
    resolved: ResolvedModel | None = None,
    tracking: Tracking | None = None,
) -> Calibration:
    """Write a calibration artifact for ``sources`` to ``out_dir`` and return it.

    ``score="auto"`` (the library's default) means wanda: calibration data is at hand,
    so the per-layer input statistics are recorded (magnitude for TorchScript models). ``samples``/``batch_size`` default
    to the source's defaults (16 per batch for
    encoders); ``selection`` to the source's default layer selection (a mapping overrides
    only the fields it names, see :func:`selection_from_dict`). ``resolved`` reuses an
    already loaded model. ``progress`` shows the calibration pass: ``auto`` a bar on a
    terminal and plain ``[fcpts] calibrate: ...`` lines elsewhere, ``bar``, ``lines`` or
    ``off`` (:class:`~fcpts.steps.common.Progress`). ``samples`` given is a count the data
    must hold (a UserError naming the data's flag otherwise). ``tracking`` logs the calibration data and the model's source
    and digest to the pipeline's MLflow run after the folder is written
    (:mod:`fcpts.steps.tracked`).
    """
    tracking = tracking.resolve() if tracking is not None else None
    with failure_recorded(tracking, "calibrate"):
        cal, local = write_output(
            out_dir,
            lambda folder: _calibrate(
                sources,
                folder,
                score=score,
                samples=samples,
                batch_size=batch_size,
                seed=seed,
                selection=selection,
                device=device,
                progress=progress,
                resolved=resolved,
                tracking=tracking,
            ),
        )
        cal.path = local
    if tracking is not None:
        log_calibration(tracking, cal.info, cal.batches)
    return cal


def _calibrate(
    sources: Sources,
    out_dir: str | os.PathLike,
    *,
    score: str,
    samples: int | None,
    batch_size: int | None,
    seed: int,
    selection: LayerSelection | Mapping[str, Any] | None,
    device: str,
    progress: str,
    resolved: ResolvedModel | None,
    tracking: Tracking | None,
) -> Calibration:
    start = time.perf_counter()
    resolve_score(score)  # an unknown score fails before the model loads
    model = resolved or resolve_model(sources.model, sources.weights)
    # auto: wanda, except for TorchScript models, which take no forward hooks
    score = resolve_score(score, default="magnitude" if model.scripted else "wanda")
    n = (
        positive_int(samples, "--calibration-samples")
        if samples
        else model.defaults["calibration_samples"]
    )
    bs = (
        positive_int(batch_size, "--batch-size")
        if batch_size
        else model.defaults["calibration_batch_size"]
    )
    data = resolve_data(sources, model)
    choice = choose_task(sources.task, model, data)
    task = choice.task
    if not isinstance(selection, LayerSelection):
        selection = selection_from_dict(selection, base=model.selection)
    layers = selection.find(layer_view(model))  # checks the patterns before any heavy work
    if needs_activations(score) and model.scripted:
        raise UserError(
            "the wanda score needs forward hooks, which TorchScript models lack: use --score magnitude"
        )

    batches = data.split("calibration", n, bs, seed, exact=bool(samples))
    if not batches:
        raise UserError(f"the calibration split of {data.source} is empty")
    dev = resolve_device(device)
    net = move(model.model, dev).eval()
    check_fit(net, task, to_device(batches[0], dev), data)

    reference, norms = _forward_pass(
        net, task, batches, dev, layers if needs_activations(score) else None, progress
    )
    move(model.model, "cpu")

    tensors = _flatten(batches, reference, norms)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, out / TENSORS_FILE)
    samples_taken = sum(task.batch_size(b) for b in batches)
    info = {
        "format": FORMAT,
        "fcpts_version": __version__,
        "sources": sources.to_dict(),
        "model": {
            "source": model.source,
            "kind": model.kind,
            "weights": model.weights,
            "sha256": model.digest(),
            "prunable_layers": len(layers),
        },
        "data": data.describe(),
        "task": task_kind(task),
        "task_reason": choice.reason,
        "task_given": choice.given,
        "split": "calibration",
        "seed": int(seed),
        "samples": samples_taken,
        "samples_requested": n,
        "batch_size": bs,
        "batches": len(batches),
        "batch_keys": sorted(batches[0].keys()) if isinstance(batches[0], Mapping) else None,
        "score": score,
        "selection": selection_to_dict(selection),
        "shapes": {k: list(v.shape) for k, v in tensors.items() if not k.startswith("input_norm.")},
        "reference_shape": [samples_taken, *list(reference[0].shape[1:])],
        "input_norm_layers": sorted(norms) if norms is not None else None,
        "tensors_file": TENSORS_FILE,
        "tensors_sha256": sha256_file(out / TENSORS_FILE),
        "sample_digests": sample_digests(batches),
        "device": str(dev),
        "step_seconds": round(time.perf_counter() - start, 3),
    }
    if tracking is not None:
        info[RECORD_KEY] = tracking.record()
    write_json(out / INFO_FILE, info)
    return Calibration(path=out, info=info, batches=batches, reference=reference, input_norms=norms)


@torch.no_grad()
def _forward_pass(net, task: Task, batches, dev, layers, mode: str):
    """One pass over the calibration batches: the dense reference outputs and, when
    ``layers`` is given, the input-channel norms of those layers (hooks on the same pass)."""
    reference: list[torch.Tensor] = []

    def run(model, batch):
        raw = task.run(model, batch)
        reference.append(task.output(raw, batch).float().cpu().contiguous())
        return raw

    on_device = (to_device(b, dev) for b in batches)
    bar = batch_progress(batches, task, "calibrate", mode, items=on_device)
    net.eval()
    if layers is None:
        for batch in bar:
            run(net, batch)
        return reference, None
    norms = collect_input_norms(net, layers, bar, run)
    return reference, {k: v.float().cpu() for k, v in norms.items()}


def _flatten(batches, reference, norms) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        items = batch.items() if isinstance(batch, Mapping) else [("", batch)]
        for key, value in items:
            if not isinstance(value, torch.Tensor):
                raise UserError(
                    f"calibration batches must hold tensors only; {key!r} is {type(value).__name__}"
                )
            name = f"batch.{i}.{key}" if key else f"batch.{i}"
            tensors[name] = value.detach().cpu().contiguous().clone()
    for i, ref in enumerate(reference):
        tensors[f"reference.{i}"] = ref.cpu().contiguous()
    for layer, norm in (norms or {}).items():
        tensors[f"input_norm.{layer}"] = norm.contiguous()
    return tensors


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT})
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read a calibration artifact folder (local or an ``s3://`` output); checks its
    format and the tensors' sha256."""
    root = input_folder(path)
    hint = "point --calibration to the --out folder of `fcpts calibrate`"
    if not root.is_dir():
        raise UserError(f"calibration folder {path} does not exist: {hint}")
    info = read_json(root / INFO_FILE, "calibration description", hint)
    if info.get("format") != FORMAT:
        raise UserError(
            f"{root / INFO_FILE} is not an fcpts calibration ({info.get('format')!r}): {hint}"
        )
    tensors_path = root / info.get("tensors_file", TENSORS_FILE)
    if not tensors_path.is_file():
        raise UserError(
            f"{tensors_path} is missing: the calibration folder is incomplete; rerun calibrate"
        )
    if info.get("tensors_sha256") and sha256_file(tensors_path) != info["tensors_sha256"]:
        raise UserError(
            f"{tensors_path} does not match the sha256 in {INFO_FILE}: the file is corrupt or was changed"
        )
    try:
        tensors = load_file(str(tensors_path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{tensors_path} is not a readable safetensors file ({exc})") from None
    n = int(info["batches"])
    batches: list[Any] = [{} for _ in range(n)]
    reference: list[torch.Tensor] = [torch.empty(0)] * n
    norms: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        if name.startswith("batch."):
            _, index, *key = name.split(".", 2)
            if key:
                batches[int(index)][key[0]] = value
            else:
                batches[int(index)] = value
        elif name.startswith("reference."):
            reference[int(name.split(".", 1)[1])] = value
        elif name.startswith("input_norm."):
            norms[name[len("input_norm.") :]] = value
    return Calibration(
        path=root,
        info=info,
        batches=batches,
        reference=reference,
        input_norms=norms if info.get("input_norm_layers") is not None else None,
    )
