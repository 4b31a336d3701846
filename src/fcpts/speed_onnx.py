"""The onnxruntime side of :mod:`fcpts.speed`: ONNX files for a dense model and its pruned
version, and sessions that time them.

Exporting MiniLM takes tens of seconds on a small CPU, so a pair of models of the same
architecture (unstructured or N:M zeros: same shapes, other values) is exported once: the
other model's file is the same graph with its weights written in. The exporter folds
``Transpose(weight)`` into anonymous initializers, so initializers are matched to the
model's tensors by value (a tensor or its transpose, bit for bit, or a tensor scaled per
output channel, where a BatchNorm was folded into the conv before it); when a tensor that
differs between the two models matches none, or matches ambiguously, the other model is
exported too. A file written this way is checked against torch on the timed batch.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .export.onnx import FILE_NAME, example_inputs, export_onnx

MATCH_TOLERANCE = (
    1e-3  # largest |onnx - torch| / max|torch| of a file whose weights were written in
)


def _digest(array: np.ndarray) -> tuple:
    return array.shape, array.dtype.str, zlib.crc32(np.ascontiguousarray(array).data)


def _views(
    state: Mapping[str, torch.Tensor], keys: set[str]
) -> dict[tuple, list[tuple[str, bool]]]:
    """Digest of each float tensor of ``keys`` (and of its transpose, for a matrix) ->
    (key, transposed)."""
    out: dict[tuple, list[tuple[str, bool]]] = {}
    for key in sorted(keys):
        t = state[key]
        if not t.is_floating_point():
            continue
        a = t.detach().cpu().numpy()
        out.setdefault(_digest(a), []).append((key, False))
        if a.ndim == 2:
            out.setdefault(_digest(a.T), []).append((key, True))
    return out


def rewrite_weights(
    source: Path, source_model: nn.Module, target_model: nn.Module, out: Path
) -> Path | None:
    """``source`` (exported from ``source_model``) with ``target_model``'s weights, written
    to ``out``; None when the two models' tensors differ in keys or shapes, or when a
    tensor that differs cannot be located in the graph unambiguously."""
    import onnx
    from onnx import numpy_helper

    src = source_model.state_dict()
    dst = target_model.state_dict()
    if src.keys() != dst.keys() or any(src[k].shape != dst[k].shape for k in src):
        return None
    changed = {
        k for k in src if src[k].data_ptr() != dst[k].data_ptr() and not torch.equal(src[k], dst[k])
    }
    views = _views(src, changed)
    graph = onnx.load(str(source))
    found: set[str] = set()
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        hits = views.get(_digest(array), [])
        if not hits:
            scaled = _scaled_match(array, src, dst, changed - found)
            if scaled is not None:
                key, new = scaled
                init.CopyFrom(numpy_helper.from_array(new, init.name))
                found.add(key)
            continue
        values = {(k, tr) for k, tr in hits}
        targets = {
            _digest(dst[k].detach().numpy().T if tr else dst[k].detach().numpy())
            for k, tr in values
        }
        if len(targets) > 1:
            return None  # equal in the source, different in the target: ambiguous
        key, transposed = next(iter(values))
        new = dst[key].detach().cpu().numpy()
        new = np.ascontiguousarray(new.T if transposed else new)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
        found.add(key)
    if changed - found:
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(out))
    return out


def _scaled_match(
    array: np.ndarray,
    src: Mapping[str, torch.Tensor],
    dst: Mapping[str, torch.Tensor],
    keys: set[str],
) -> tuple[str, np.ndarray] | None:
    """A weight the exporter scaled per output channel (a BatchNorm folded into the conv
    before it): the key whose source tensor times one factor per channel is ``array``, and
    the target tensor times the same factors."""
    if array.dtype != np.float32 or array.ndim < 2:
        return None
    for key in sorted(keys):
        w = src[key].detach().cpu().numpy()
        if w.shape != array.shape or not np.array_equal(w == 0, array == 0):
            continue
        rows, got = w.reshape(len(w), -1).astype(np.float64), array.reshape(len(w), -1)
        norms = (rows * rows).sum(1)
        if (norms == 0).any():
            continue  # an all-zero channel: its factor is unknown
        factor = (rows * got).sum(1) / norms
        fitted = rows * factor[:, None]
        if np.abs(fitted - got).max() <= 1e-5 * max(float(np.abs(got).max()), 1e-12):
            target = dst[key].detach().cpu().numpy().reshape(len(w), -1) * factor[:, None]
            return key, np.ascontiguousarray(target.reshape(array.shape).astype(np.float32))
    return None


def files_in(**folders: str | Path) -> dict[str, Path]:
    """The ``model.onnx`` of each folder that has one, as :func:`runners`' ``files``
    (``files_in(pruned=allocate_output)``)."""
    found = {name: Path(folder) / FILE_NAME for name, folder in folders.items()}
    return {name: path for name, path in found.items() if path.is_file()}


def session(path: Path, threads: int):
    """An onnxruntime CPU session with ``threads`` intra-op threads, one inter-op thread and
    no spinning (a spinning pool would take the CPU from the other model's runs)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(sess, model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    named = example_inputs(model, args, kwargs)
    return {i.name: np.ascontiguousarray(named[i.name].numpy()) for i in sess.get_inputs()}


def _matches_torch(sess, feeds, model: nn.Module, args, kwargs) -> bool:
    with torch.inference_mode():
        raw = model(*args, **kwargs)
    if hasattr(raw, "last_hidden_state"):
        raw = raw.last_hidden_state
    elif hasattr(raw, "to_tuple"):  # another Hugging Face output: its first field
        raw = raw.to_tuple()[0]
    ref = (raw[0] if isinstance(raw, (tuple, list)) else raw).numpy()
    got = sess.run(None, feeds)[0]
    scale = max(float(np.abs(ref).max()), 1e-12)
    return got.shape == ref.shape and float(np.abs(got - ref).max()) / scale <= MATCH_TOLERANCE


def runners(
    dense: nn.Module,
    pruned: nn.Module,
    args: tuple,
    kwargs: Mapping[str, Any],
    threads: int,
    tmp: Path,
    files: Mapping[str, str | Path] | None = None,
) -> tuple[Callable[[], Any], Callable[[], Any], dict[str, Any]]:
    """(run_dense, run_pruned, how each file was made) for onnxruntime. ``files`` may give
    either model's ONNX file already written (e.g. an allocate output's model.onnx)."""
    models = {"dense": dense, "pruned": pruned}
    paths = {k: Path(v) for k, v in (files or {}).items() if v and k in models}
    how = dict.fromkeys(paths, "given")
    for name in ("dense", "pruned"):
        if name in paths:
            continue
        other = "pruned" if name == "dense" else "dense"
        if other in paths:
            written = rewrite_weights(
                paths[other], models[other], models[name], tmp / name / FILE_NAME
            )
            if written is not None:
                paths[name], how[name] = written, f"the {other} graph with these weights"
                continue
        paths[name], how[name] = export_onnx(models[name], tmp / name, args, kwargs), "exported"
    run = {}
    for name, path in paths.items():
        sess = session(path, threads)
        feeds = _feeds(sess, models[name], args, kwargs)
        if how[name].startswith("the ") and not _matches_torch(
            sess, feeds, models[name], args, kwargs
        ):
            path = export_onnx(models[name], tmp / f"{name}-exported", args, kwargs)
            sess, how[name] = session(path, threads), "exported"
        run[name] = (lambda s, f: lambda: s.run(None, f))(sess, feeds)
    extra = {"intra_op_threads": threads, "inter_op_threads": 1, "onnx_files": how}
    return run["dense"], run["pruned"], extra
