"""Measured speed: a dense model and its pruned version timed side by side.

:func:`compare` times both models on one batch in one process, per engine, with the two
runs interleaved (dense, pruned, dense, pruned ...) so that machine load affects both
alike, and reports medians of the repeated timings, the spread (interquartile range), the
speed-up ratio dense / pruned and whether the pruned model is slower.

Engines:

* ``torch``: eager PyTorch on the CPU under ``torch.inference_mode``;
* ``onnxruntime``: each model as ONNX (exported by :func:`fcpts.export.onnx.export_onnx`
  into a temporary folder, or given; a pair of the same shapes is exported once, see
  :mod:`fcpts.speed_onnx`) run by an ``InferenceSession`` on the CPU provider (intra-op
  threads set explicitly, spinning off so that neither session starves the other);
* ``torch-csr``: the dense model in eager torch against the pruned model with every Linear
  weight that has zeros held as a sparse CSR tensor (matmul by ``torch.sparse.mm``): what
  unstructured sparsity buys from a sparse kernel on the CPU;
* ``cuda``: eager torch on a CUDA GPU, synchronised around each run;
* ``cuda-2to4``: float16 on a CUDA GPU, the pruned model's 2:4 Linear weights as
  ``torch.sparse.to_sparse_semi_structured`` tensors (the dense model in float16 too).

The CUDA engines run only where ``torch.cuda.is_available()``; with ``device="auto"`` or
``"cuda"`` they are added to the engines asked for (``cuda-2to4`` only when the pruned
model's sparse Linear weights are all 2:4). CI never needs a GPU.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import speed_onnx
from .errors import UserError
from .sparse_kernels import csr_model, pruned_two_four, semi_structured_model
from .tasks import Task

CPU_ENGINES = ("torch", "onnxruntime", "torch-csr")
CUDA_ENGINES = ("cuda", "cuda-2to4")
ENGINES = CPU_ENGINES + CUDA_ENGINES
ORDER = "interleaved"
MIN_REPEATS = 3  # a time budget never cuts the timed pairs below this
HINTS = {
    "unstructured": "unstructured zeros do not speed up dense kernels; use --structure units",
    "n:m": "N:M zeros run faster only through semi-structured sparse kernels on a CUDA GPU; "
    "use --structure units for CPU speed",
    "units": "the smaller model is not faster on this engine at this batch size; "
    "remove more units or time a larger batch",
}


# ------------------------------------------------------------------------ inputs


def split_inputs(inputs: Any, task: Task | None = None) -> tuple[tuple, dict]:
    """A batch as call arguments: by ``task.split`` when given; otherwise a tensor (or a
    tuple of them) is positional, a mapping with ``input_ids`` is keyword arguments (an HF
    batch), a mapping with ``x`` calls with ``x`` (the demos' batches), any other mapping is
    keyword arguments."""
    if task is not None:
        return task.split(inputs)
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    if isinstance(inputs, Mapping):
        if "input_ids" in inputs:
            return (), dict(inputs)
        if "x" in inputs:
            return (inputs["x"],), {}
        return (), dict(inputs)
    raise UserError(
        f"cannot time a model on a {type(inputs).__name__}: give a tensor, a tuple of tensors "
        "or a mapping of named tensors"
    )


def head(batch: Any, n: int) -> Any:
    """The first ``n`` samples of a batch (a tensor or a mapping of tensors)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    if isinstance(batch, Mapping):
        return {k: v[:n] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def engine_list(text: str | Sequence[str], flag: str = "engines") -> tuple[str, ...]:
    """Engine names from ``torch,onnxruntime`` (or a sequence), each checked."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    bad = [n for n in names if n not in ENGINES]
    if bad or not names:
        raise UserError(f"{flag} {text!r}: give a comma-separated list of {', '.join(ENGINES)}")
    return tuple(dict.fromkeys(names))


def batch_size(args: tuple, kwargs: Mapping[str, Any]) -> int:
    first = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))
    return int(first.shape[0])


def _moved(args: tuple, kwargs: Mapping[str, Any], device: Any, dtype=None):
    def one(v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.to(device)
        return v.to(dtype) if dtype is not None and v.is_floating_point() else v

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


# ------------------------------------------------------------------------ timing


def timed_pairs(
    run_dense: Callable[[], Any],
    run_pruned: Callable[[], Any],
    *,
    repeats: int,
    warmup: int,
    seconds: float | None = None,
    sync: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Time ``run_dense`` and ``run_pruned`` alternately ``repeats`` times each (fewer, at
    least MIN_REPEATS, when ``seconds`` runs out first) after ``warmup`` untimed runs each."""
    sync = sync or (lambda: None)
    for _ in range(warmup):
        run_dense()
        run_pruned()
    sync()
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    order: list[str] = []
    deadline = None if seconds is None else time.perf_counter() + max(0.0, seconds)
    for i in range(max(1, repeats)):
        for name, fn in (("dense", run_dense), ("pruned", run_pruned)):
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            order.append(name[0])
        if deadline is not None and i + 1 >= MIN_REPEATS and time.perf_counter() >= deadline:
            break
    return {"times": times, "order": "".join(order)}


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def summarise(times: Mapping[str, Sequence[float]], order: str, **extra: Any) -> dict[str, Any]:
    """One engine's figures from its timings in seconds: medians and IQRs in ms, the ratio
    dense / pruned (> 1: the pruned model is faster), ``slower`` and ``within_spread``
    (the two medians differ by no more than the larger IQR: timing noise could explain it)."""
    out: dict[str, Any] = {}
    for name in ("dense", "pruned"):
        lo, hi = _quartiles(times[name])
        out[f"{name}_ms"] = 1000 * statistics.median(times[name])
        out[f"{name}_iqr_ms"] = 1000 * (hi - lo)
    out["ratio"] = out["dense_ms"] / out["pruned_ms"] if out["pruned_ms"] > 0 else float("inf")
    out["slower"] = is_slower(out["ratio"])
    gap = abs(out["dense_ms"] - out["pruned_ms"])
    out["within_spread"] = gap <= max(out["dense_iqr_ms"], out["pruned_iqr_ms"])
    out["repeats"] = len(times["dense"])
    out["order"] = order
    out.update(extra)
    return out


def is_slower(ratio: float) -> bool:
    """The pruned model is slower when dense / pruned time is below 1."""
    return ratio < 1.0


@contextmanager
def _torch_threads(threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------ engines


def _eager(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]) -> Callable[[], Any]:
    def run():
        with torch.inference_mode():
            return model(*args, **kwargs)

    return run


def _cpu_engine(engine, dense, pruned, args, kwargs, threads, tmp: Path, onnx_files):
    """(run_dense, run_pruned, extra figures) of a CPU engine."""
    if engine == "torch":
        return _eager(dense, args, kwargs), _eager(pruned, args, kwargs), {}
    if engine == "torch-csr":
        net, count = csr_model(pruned)
        if not count:
            raise UserError("the pruned model has no Linear weight with zeros to hold as CSR")
        return _eager(dense, args, kwargs), _eager(net, args, kwargs), {"csr_layers": count}
    return speed_onnx.runners(dense, pruned, args, kwargs, threads, tmp, onnx_files)


def _cuda_engine(engine, dense, pruned, args, kwargs):
    """(run_dense, run_pruned, extra figures) of a CUDA engine (only called with a GPU)."""
    dev = torch.device("cuda")
    if engine == "cuda":
        d, p = copy.deepcopy(dense).to(dev).eval(), copy.deepcopy(pruned).to(dev).eval()
        a, k = _moved(args, kwargs, dev)
        return _eager(d, a, k), _eager(p, a, k), {"dtype": "float32"}
    d = copy.deepcopy(dense).to(dev, torch.float16).eval()
    p, count = semi_structured_model(pruned, dev)
    if not count:
        raise UserError(
            "the pruned model has no 2:4 Linear weight the semi-structured kernels take"
        )
    a, k = _moved(args, kwargs, dev, torch.float16)
    return _eager(d, a, k), _eager(p, a, k), {"dtype": "float16", "semi_structured_layers": count}


def engines_for(engines: Sequence[str], device: str, pruned: nn.Module) -> list[str]:
    """The engines to time: those asked for, plus the CUDA ones where a GPU is present and
    ``device`` is auto or cuda."""
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        raise UserError(f"unknown speed engine(s) {unknown}: choose from {', '.join(ENGINES)}")
    if device not in ("auto", "cpu", "cuda") and not str(device).startswith("cuda"):
        raise UserError(f"device {device!r}: use auto, cpu or cuda")
    cuda = torch.cuda.is_available()
    asked = [e for e in engines if e in CUDA_ENGINES]
    if (str(device).startswith("cuda") or asked) and not cuda:
        raise UserError(
            "CUDA timing asked for but no CUDA GPU is visible: use --device cpu and CPU engines"
        )
    out = list(dict.fromkeys(engines))
    if cuda and device != "cpu":
        out += [e for e in ("cuda",) if e not in out]
        if pruned_two_four(pruned) and "cuda-2to4" not in out:
            out.append("cuda-2to4")
    return out


def compare(
    dense: nn.Module,
    pruned: nn.Module,
    inputs: Any,
    *,
    engines: Sequence[str] = ("torch", "onnxruntime"),
    repeats: int = 20,
    warmup: int = 2,
    device: str = "cpu",
    threads: int | None = None,
    seconds: float | None = None,
    task: Task | None = None,
    onnx_files: Mapping[str, str | Path] | None = None,
) -> dict[str, Any]:
    """Time ``dense`` and ``pruned`` on the batch ``inputs`` per engine (see the module),
    interleaved, ``repeats`` timed runs each after ``warmup``; ``seconds``, when given, is
    each engine's time budget (at least MIN_REPEATS pairs run). ``threads`` defaults to
    torch's thread count; ``task`` splits the batch (else :func:`split_inputs`);
    ``onnx_files`` may give ``{"dense": path, "pruned": path}`` (either) already exported.

    Returns ``{"batch_size", "threads", "order", "engines": {engine: {dense_ms, pruned_ms,
    dense_iqr_ms, pruned_iqr_ms, ratio, slower, repeats, order, threads, device, ...}},
    "skipped": {engine: reason}, "slower": [engines where the pruned model is slower]}``.
    An engine that cannot run the models (an export that fails, say) is skipped with the
    reason, so one engine's failure does not lose the others' figures. Both models are moved
    to the CPU and put in eval mode (the CUDA engines time copies).
    """
    if repeats < 1 or warmup < 0:
        raise UserError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    threads = int(threads or torch.get_num_threads())
    args, kwargs = split_inputs(inputs, task)
    args, kwargs = _moved(args, kwargs, "cpu")
    dense, pruned = dense.cpu().eval(), pruned.cpu().eval()
    result: dict[str, Any] = {
        "batch_size": batch_size(args, kwargs),
        "threads": threads,
        "order": f"{ORDER}: dense, pruned, dense, pruned ... within each engine",
        "engines": {},
        "skipped": {},
    }
    with tempfile.TemporaryDirectory(prefix="fcpts-speed-") as tmp, _torch_threads(threads):
        for engine in engines_for(engines, device, pruned):
            on_cuda = engine in CUDA_ENGINES
            try:
                if on_cuda:
                    run_d, run_p, extra = _cuda_engine(engine, dense, pruned, args, kwargs)
                else:
                    run_d, run_p, extra = _cpu_engine(
                        engine, dense, pruned, args, kwargs, threads, Path(tmp), onnx_files
                    )
                timed = timed_pairs(
                    run_d,
                    run_p,
                    repeats=repeats,
                    warmup=warmup,
                    seconds=seconds,
                    sync=torch.cuda.synchronize if on_cuda else None,
                )
            except Exception as exc:  # one engine's failure is reported, not fatal
                result["skipped"][engine] = f"{type(exc).__name__}: {str(exc)[:300]}"
                continue
            result["engines"][engine] = summarise(
                timed["times"],
                timed["order"],
                threads=threads,
                device="cuda" if on_cuda else "cpu",
                **extra,
            )
    result["slower"] = [e for e, r in result["engines"].items() if r["slower"]]
    return result


def slower_lines(result: Mapping[str, Any], structure: str = "unstructured") -> list[str]:
    """One plain line per engine where the pruned model is slower, with what to do about it
    for the model's ``structure`` (unstructured, N:M like 2:4, or units)."""
    kind = "units" if structure == "units" else ("n:m" if ":" in structure else "unstructured")
    return [
        f"the pruned model is {r['ratio']:.2f}x dense speed (slower) on {engine}: {HINTS[kind]}"
        + (
            f" (the gap is within the timing spread of {r['repeats']} runs: a longer "
            "--latency-seconds measures it better)"
            if r.get("within_spread")
            else ""
        )
        for engine, r in result["engines"].items()
        if r["slower"]
    ]


def ratio_line(result: Mapping[str, Any]) -> str:
    """The speed-ups in one line: ``torch 1.52x, onnxruntime 1.21x``."""
    parts = [f"{e} {r['ratio']:.2f}x" for e, r in result["engines"].items()]
    return ", ".join(parts + [f"{e} skipped" for e in result.get("skipped", {})])


def headline(result: Mapping[str, Any], structure: str = "unstructured") -> dict[str, Any]:
    """A :func:`compare` result for a report: the headline figures (``dense_ms``,
    ``sparse_ms``, ``ratio``) of torch (else the first engine), ``speedup_<engine>`` for
    each engine, ``slower`` (true when the pruned model is slower on any engine) with
    ``slower_engines`` and their plain ``notes`` (:func:`slower_lines`), and the whole
    result per engine."""
    engines = result["engines"]
    name = "torch" if "torch" in engines else next(iter(engines))
    first = engines[name]
    return {
        "device": first["device"],
        "engine": name,
        "threads": result["threads"],
        "batch_size": result["batch_size"],
        "runs": first["repeats"],
        "dense_ms": first["dense_ms"],
        "sparse_ms": first["pruned_ms"],
        "ratio": first["ratio"],
        "kernels": f"{name}; speed-up dense/sparse {ratio_line(result)}",
        **{f"speedup_{e}": r["ratio"] for e, r in engines.items()},
        "slower": bool(result["slower"]),
        "slower_engines": list(result["slower"]),
        "notes": slower_lines(result, structure),
        "engines": dict(engines),
        "skipped": dict(result.get("skipped", {})),
        "order": result["order"],
    }
