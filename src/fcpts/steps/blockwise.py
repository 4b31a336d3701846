"""The allocate step's block-wise path (``--blockwise on``, or ``auto`` on a decoder whose
whole-model learning would not fit ``--memory-mb``).

:func:`fcpts.blockwise.allocate_blockwise` runs into a work folder under the step's
checkpoint folder (its per-block checkpoints there, so ``--resume`` continues a killed
run); its result is loaded back and handed to the allocate step as the sparse model and
an :class:`~fcpts.alloc.Allocation`, so that the step writes it as it writes every other
allocation (the model in its source's format, ``model.onnx``, ``manifest.json``, MLflow).

Memory: the learning holds one block, its Hessians and the calibration stream (within
``memory_mb``, spilled to disk beyond). The step itself still loads the dense model once,
to check it is the calibrated one, and frees it (when it loaded it) before allocating; it
loads the sparse result once to write it: 1x the model in fp32 at a time, without the
gradients, optimizer states and teacher copy (about 5x) of the whole-model learning.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from ..alloc import Allocation
from ..alloc.base import LayerResult
from ..blockwise import BlockwiseConfig, allocate_blockwise
from ..blockwise.decoder import Decoder
from ..core import LayerSelection
from ..demos.gpt2 import load_causal_lm
from ..errors import UserError
from ..layers import find_prunable
from ..sources import ResolvedModel, layer_view
from ..sources.causal_lm import causal_architecture
from .common import selection_to_dict

WORK_DIR = "blockwise"  # under the step's checkpoint folder
LEARNING_COPIES = 5  # whole-model learning: weights, gradients, Adam's two moments, teacher
SHARED_SETTINGS = ("iters", "lr", "lam", "tolerance", "ste_width", "kde_samples", "seed")


def chosen(mode: str, *, problem: str | None, weight_bytes: int, memory_mb: int) -> bool:
    """Whether the step allocates block-wise: ``on`` always (``problem``, a reason it
    cannot, is then an error), ``off`` never, ``auto`` where it can and the whole-model
    learning (about 5x the fp32 weights) would exceed ``memory_mb`` MiB."""
    if mode not in ("off", "on", "auto"):
        raise UserError(f"--blockwise must be off, on or auto, got {mode!r}")
    if mode == "on" and problem:
        raise UserError(f"--blockwise on: {problem}; or use --blockwise off")
    if mode == "auto":
        return problem is None and LEARNING_COPIES * weight_bytes > int(memory_mb) << 20
    return mode == "on"


def picked(
    mode: str,
    memory_mb: int | None,
    model: ResolvedModel,
    settings: dict[str, Any],
    method: str,
    structure: str,
    save: str,
    score: str,
    selection: LayerSelection,
) -> BlockwiseConfig | None:
    """The block-wise settings when the step allocates block-wise (see :func:`chosen`),
    else None. ``memory_mb`` None is :class:`~fcpts.blockwise.BlockwiseConfig`'s."""
    memory_mb = BlockwiseConfig.memory_mb if memory_mb is None else int(memory_mb)
    if memory_mb < 0:
        raise UserError(f"--memory-mb must be >= 0 (MiB), got {memory_mb}")
    if mode == "off":
        return None
    why = problem(
        model, method=method, structure=structure, save=save, score=score, selection=selection
    )
    size = weight_bytes(model.model)
    return (
        config(settings, memory_mb)
        if chosen(mode, problem=why, weight_bytes=size, memory_mb=memory_mb)
        else None
    )


def problem(
    model: ResolvedModel,
    *,
    method: str,
    structure: str,
    save: str,
    score: str,
    selection: LayerSelection,
) -> str | None:
    """Why these options cannot run block-wise (None: they can)."""
    if model.folder is None or causal_architecture(model.folder) is None:
        return (
            f"it needs a Hugging Face decoder folder (a causal LM), and {model.source} is not one"
        )
    if method != "fcpts":
        return f"it runs the fcpts method only, not --method {method}: drop --method"
    if structure != "unstructured":
        return f"it prunes single weights only, not --structure {structure}: drop --structure"
    if save != "dense":
        return f"it writes --save dense only, not --save {save}: drop --save"
    if score != "wanda":
        return (
            f"it scores by wanda on each block's inputs, not {score}: calibrate with "
            "--score wanda (the default for decoders)"
        )
    if selection_to_dict(selection) != selection_to_dict(model.selection):
        return (
            "it prunes every linear layer of the decoder blocks and takes no layer "
            "selection: drop --include, --exclude, --keep-dense, --bounds, --min-sparsity "
            "and --max-sparsity"
        )
    return None


def weight_bytes(model: nn.Module) -> int:
    """The model's parameters in fp32."""
    return 4 * sum(p.numel() for p in model.parameters())


def config(settings: dict[str, Any], memory_mb: int) -> BlockwiseConfig:
    """The block-wise settings from the fcpts settings given (the ones both share)."""
    unused = sorted(set(settings) - set(SHARED_SETTINGS))
    if unused:
        raise UserError(
            f"--blockwise takes only the fcpts settings {', '.join(SHARED_SETTINGS)} "
            f"(iters: threshold steps per block); drop {', '.join(unused)}"
        )
    return BlockwiseConfig(**settings, memory_mb=int(memory_mb))


def allocate(
    model: ResolvedModel,
    batches: list[Any],
    checkpoint: Path,
    cfg: BlockwiseConfig,
    target: float,
    selection: LayerSelection,
    resume: bool,
    release: bool,
) -> tuple[Allocation, nn.Module, dict[str, Any]]:
    """Allocate block-wise; returns the allocation, the sparse model and the manifest's
    ``blockwise_run`` section. ``release`` frees the dense model first (the step loaded
    it only to check it)."""
    specs = selection.find(layer_view(model))
    dense = model.model
    prefix = Decoder(model.folder).prefix + "."
    blocks = {layer.name for layer in find_prunable(dense) if layer.name.startswith(prefix)}
    if blocks != {s.name for s in specs}:
        raise UserError(
            "--blockwise prunes the linear layers of the decoder blocks, and the layer "
            f"selection differs ({sorted(blocks ^ {s.name for s in specs})[:3]}): use "
            "--blockwise off"
        )
    existing = {s.name: int((dense.get_submodule(s.name).weight == 0).sum()) for s in specs}
    if release:
        model.model = None  # the dense weights are read block by block from now on
    del dense
    work = checkpoint / WORK_DIR
    if resume and (work / ".blockwise" / "state.json").is_file():
        print(f"[fcpts] resuming block-wise from {work}", flush=True)
    result = allocate_blockwise(model.folder, batches, target, work, cfg, resume=resume)
    zeros = {layer["name"]: layer["zeros"] for layer in result["layers"]}
    sparse, _ = load_causal_lm(work)
    layers = [
        LayerResult(s.name, tuple(s.shape), s.numel, zeros[s.name], math.nan, existing[s.name])
        for s in specs
    ]
    weights = None
    if cfg.reconstruct == "obs":  # the updated weights, as the model holds them
        weights = {s.name: sparse.get_submodule(s.name).weight.detach() for s in specs}
    allocation = Allocation(
        method="fcpts",
        score="wanda",
        target=target,
        layers=layers,
        masks={},  # not needed: the sparse model is the result
        settings=dataclasses.asdict(cfg),
        weights=weights,
        history=[dict(step, block=b["block"]) for b in result["blocks"] for step in b["steps"]],
    )
    details = {
        "memory_mb": cfg.memory_mb,
        "blocks": [{k: b[k] for k in ("block", "goal", "zeros")} for b in result["blocks"]],
        "spilled_batches": result["spilled_batches"],
    }
    return allocation, sparse.eval(), details


def free_work(checkpoint: Path) -> None:
    """Remove the block-wise work folder once the step's output is written."""
    shutil.rmtree(checkpoint / WORK_DIR, ignore_errors=True)
