"""The block-wise driver: blocks in order, one resident at a time, checkpointed per block.

For block b: read its weights from the shards; run the dense block on the (already
pruned) stream of calibration hidden states, recording its outputs and its layers' input
statistics; learn its thresholds (:mod:`.learn`); count its zeros (the last block takes
exactly what remains of round(S* x N)); prune it (OBS or masks); write its tensors as a
shard of the output folder; push the stream through the pruned block. After each block
the state (zeros placed, counts, the stream) is saved under ``<out>/.blockwise``, so a
killed run resumes at the next block with the same result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..landing import check_target, target_zeros
from ..layers import LayerSpec, find_prunable
from ..scores import compute_scores
from .decoder import Decoder, run_block
from .learn import (
    BlockwiseConfig,
    block_counts,
    dense_pass,
    learn_thresholds,
    learned_zeros,
    prune_block,
)
from .shards import INDEX
from .store import ActivationStore

STATE_DIR = ".blockwise"
RESULT = "allocation.json"
COPIED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)


def _atomic_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _atomic_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _fingerprint(decoder: Decoder, batches: Sequence[dict], target: float, cfg) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps({"cfg": dataclasses.asdict(cfg), "target": target}, sort_keys=True).encode()
    )
    h.update(json.dumps(decoder.reader.weight_map, sort_keys=True).encode())
    for b in batches:
        h.update(b["input_ids"].numpy().tobytes())
    return h.hexdigest()


def _block_layers(block: torch.nn.Module, size: int | None = None) -> list[LayerSpec]:
    """The block's linear layers; every block must hold as many weights as the first."""
    layers = find_prunable(block)
    if size is not None and sum(layer.numel for layer in layers) != size:
        raise UserError("the block-wise path needs decoder blocks of one shape; this one differs")
    return layers


def allocate_blockwise(
    folder: str | os.PathLike,
    batches: Sequence[dict[str, torch.Tensor]],
    target: float,
    out_dir: str | os.PathLike,
    config: BlockwiseConfig | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Allocate ``target`` over the decoder blocks' linear layers of the decoder in
    ``folder``, block by block, and write the sparse model to ``out_dir`` (safetensors
    shards with an index, the config and tokenizer: it loads with
    ``AutoModelForCausalLM.from_pretrained``). Returns what ``allocation.json`` holds.

    ``batches`` are token blocks (``input_ids``, ``attention_mask``). With ``resume`` a
    checkpoint of the same inputs in ``out_dir`` is continued; another is discarded.
    """
    cfg = config or BlockwiseConfig()
    target = check_target(target)
    decoder = Decoder(folder)
    out = Path(out_dir)
    state_dir = out / STATE_DIR
    out.mkdir(parents=True, exist_ok=True)
    shell = decoder.shell()
    extras, stream = [], ActivationStore(cfg.memory_mb << 20, state_dir / "spill-a")
    for batch in batches:
        hidden, args, kwargs = decoder.block_inputs(shell, batch)
        extras.append((args, kwargs))
        stream.append(hidden)
    del shell
    # the layers of every block, from the shard index alone (one block is built to learn them)
    first = _block_layers(decoder.block(0))
    sizes = [sum(layer.numel for layer in first)] * decoder.blocks
    total = sum(sizes)
    k = target_zeros(target, [LayerSpec("all", "linear", (total,))])
    fingerprint = _fingerprint(decoder, batches, target, cfg)
    state = {
        "fingerprint": fingerprint,
        "next_block": 0,
        "zeros_done": 0,
        "layers": [],
        "history": [],
    }
    saved = state_dir / "state.json"
    if resume and saved.is_file():
        old = json.loads(saved.read_text())
        if old.get("fingerprint") == fingerprint and old["next_block"] > 0:
            state = old
            stream = ActivationStore.load(
                state_dir / "stream", cfg.memory_mb << 20, state_dir / "spill-r"
            )
    if state["next_block"] == 0:
        shutil.rmtree(state_dir / "stream", ignore_errors=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    peak_spilled = stream.spilled
    for b in range(state["next_block"], decoder.blocks):
        block = decoder.block(b)
        layers = _block_layers(block, sizes[b])
        targets = ActivationStore(cfg.memory_mb << 20, state_dir / "spill-b")
        stats = dense_pass(block, layers, stream, extras, targets)
        weights = {layer.name: block.get_submodule(layer.name).weight.detach() for layer in layers}
        scores = compute_scores(weights, layers, "wanda", stats.norms())
        n_b, rest = sizes[b], sum(sizes[b + 1 :])
        remaining = k - state["zeros_done"]
        goal = min(1.0, max(0.0, (remaining - rest * target) / n_b))
        budget = {
            "target": target,
            "total": total,
            "zeros_done": state["zeros_done"],
            "rest": rest,
            "goal": goal,
            "blocks": decoder.blocks,
        }
        thresholds, history = learn_thresholds(
            block, layers, scores, (stream, extras, targets), budget, cfg, cfg.seed + b
        )
        zeros_b = remaining if b == decoder.blocks - 1 else learned_zeros(scores, thresholds)
        zeros_b = min(n_b, remaining, max(zeros_b, remaining - rest))
        counts = block_counts(layers, scores, thresholds, zeros_b)
        prune_block(block, layers, scores, counts, stats, cfg)
        prefix = decoder.block_prefix(b)
        _atomic_tensors(
            out / f"block-{b:05d}.safetensors",
            {prefix + n: t for n, t in block.state_dict().items()},
        )
        nxt = ActivationStore(cfg.memory_mb << 20, state_dir / ("spill-a" if b % 2 else "spill-c"))
        with torch.no_grad():
            for i in range(len(stream)):
                nxt.append(run_block(block, stream[i], *extras[i]))
        peak_spilled = max(peak_spilled, stream.spilled + targets.spilled)
        targets.clear()
        stream.clear()
        stream = nxt
        del block, stats, scores, weights
        state["zeros_done"] += zeros_b
        state["layers"] += [
            {
                "name": prefix + layer.name,
                "numel": layer.numel,
                "zeros": counts[layer.name],
                "sparsity": counts[layer.name] / layer.numel,
            }
            for layer in layers
        ]
        state["history"].append({"block": b, "goal": goal, "zeros": zeros_b, "steps": history})
        state["next_block"] = b + 1
        stream.save(state_dir / "stream")
        _atomic_json(saved, state)
    return _finish(decoder, out, state, target, k, total, peak_spilled)


def _finish(
    decoder: Decoder, out: Path, state: dict, target: float, k: int, total: int, spilled: int
) -> dict:
    """The non-block tensors, the shard index, config/tokenizer copies and allocation.json."""
    reader = decoder.reader
    rest_names = [n for n in reader.names() if not n.startswith(decoder.prefix + ".")]
    _atomic_tensors(out / "rest.safetensors", reader.read(rest_names))
    weight_map = {n: "rest.safetensors" for n in rest_names}
    for n in reader.names():
        if n.startswith(decoder.prefix + "."):
            b = int(n[len(decoder.prefix) + 1 :].split(".", 1)[0])
            weight_map[n] = f"block-{b:05d}.safetensors"
    _atomic_json(out / INDEX, {"metadata": {"format": "pt"}, "weight_map": weight_map})
    for name in COPIED:
        if (Path(decoder.folder) / name).is_file():
            shutil.copyfile(Path(decoder.folder) / name, out / name)
    result = {
        "method": "fcpts-blockwise",
        "target": target,
        "zeros": state["zeros_done"],
        "prunable": total,
        "target_zeros": k,
        "achieved_sparsity": state["zeros_done"] / total,
        "exact": state["zeros_done"] == k,
        "layers": state["layers"],
        "blocks": state["history"],
        "spilled_batches": spilled,
    }
    _atomic_json(out / RESULT, result)
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return result
