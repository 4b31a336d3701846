"""Quality against measured speed-up, per structure and budget; writes a section of RESULTS.md.

For all-MiniLM-L6-v2 and the digits CNN: the dense model, ``--structure units --budget
flops`` at each target for the learned allocation (fcpts, at the default ``--unit-multiple
8`` and at any width) and for uniform units (with the least-squares refit of the removed
units' consumers, or with fcpts's joint reconstruction); ``2:4`` (dense kernels on the
CPU: its speed is that of the dense model); and an unstructured row at 0.9 timed with torch
CSR matmuls in its Linear layers (MiniLM). Quality is measured on the evaluation split
(disjoint from calibration); no setting here was tuned on it.

Speed: torch and onnxruntime on the CPU, dense and pruned calls interleaved, the median of
``--repeats`` timings after ``--warmup`` calls, at batch 16 x 64 tokens (MiniLM) or 256
images (digits). Usage: ``python bench/speed.py [--cases minilm,digits] [--targets 0.5,0.6]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from run import machine  # bench/run.py
from torch import nn

from fcpts.demos import load_demo, text
from fcpts.export.onnx import example_inputs, export_onnx
from fcpts.metrics import mean_cosine, outputs, top1
from fcpts.sparse_model import apply_allocation
from fcpts.structured import shrink_to, sparsify_nm

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- speed:begin -->", "<!-- speed:end -->"
ROWS = "<!-- speed:rows "
TITLE = "## Speed: structured allocation, quality vs measured CPU speed-up"


METHODS = {  # --methods name: (row label, allocation method, its settings, shrink_to's)
    "fcpts": ("fcpts units (learned)", "fcpts", {}, {}),
    "fcpts-any-width": (
        "fcpts units (learned), any width (--unit-multiple 1)",
        "fcpts",
        {},
        {"unit_multiple": 1},
    ),
    "uniform": ("uniform units", "uniform", {}, {}),
    "uniform-joint": (
        "uniform units + fcpts joint recon",
        "fcpts",
        {"init": "uniform", "learn_thresholds": False},
        {},
    ),
}


def interleaved(dense: Callable[[], Any], pruned: Callable[[], Any], repeats: int, warmup: int):
    """Median seconds of ``dense()`` and ``pruned()``, called alternately."""
    for _ in range(warmup):
        dense()
        pruned()
    td, tp = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        dense()
        td.append(time.perf_counter() - t)
        t = time.perf_counter()
        pruned()
        tp.append(time.perf_counter() - t)
    return statistics.median(td), statistics.median(tp)


def torch_call(model: nn.Module, args: tuple, kwargs: dict) -> Callable[[], Any]:
    model.eval()

    def call():
        with torch.no_grad():
            return model(*args, **kwargs)

    return call


def ort_call(model: nn.Module, args: tuple, kwargs: dict, folder: Path) -> Callable[[], Any]:
    import onnxruntime as ort

    path = export_onnx(model, folder, args, kwargs)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inputs = example_inputs(model, args, kwargs)
    feeds = {i.name: np.asarray(inputs[i.name].numpy()) for i in session.get_inputs()}
    return lambda: session.run(None, feeds)


class CSRLinear(nn.Module):
    """A Linear whose (sparse) weight multiplies through torch's CSR kernel."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight_csr = linear.weight.detach().to_sparse_csr()
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        out = torch.sparse.mm(self.weight_csr, flat.T).T
        out = out + self.bias if self.bias is not None else out
        return out.reshape(*x.shape[:-1], -1)


def with_csr(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        for child, sub in list(m.named_children()):
            if isinstance(sub, nn.Linear) and "pooler" not in f"{name}.{child}":
                setattr(m, child, CSRLinear(sub))
    return out


def speed(dense: nn.Module, pruned: nn.Module | None, call_args, args, tmp: Path, ort: bool):
    a, kw = call_args
    if pruned is None:
        return None, None
    d, p = interleaved(
        torch_call(dense, a, kw), torch_call(pruned, a, kw), args.repeats, args.warmup
    )
    torch_x = d / p
    ort_x = None
    if ort:
        od = ort_call(dense, a, kw, tmp / "dense")
        op = ort_call(pruned, a, kw, tmp / f"p{time.monotonic_ns()}")
        d, p = interleaved(od, op, args.repeats, args.warmup)
        ort_x = d / p
    return torch_x, ort_x


def case_rows(name: str, args) -> list[dict[str, Any]]:
    demo = load_demo(f"demo:{name}")
    model = demo.model.eval()
    calib = demo.split(
        "calibration", demo.defaults["calibration_samples"], demo.defaults["batch_size"]
    )
    held = demo.split("evaluation", demo.defaults.get("evaluation_samples", 300), 64)
    ref = outputs(model, demo.task, held)
    if name == "minilm":
        enc = demo.tokenizer(
            text.split(text.sentences(), "validation", 16),
            padding="max_length",
            max_length=64,
            truncation=True,
            return_tensors="pt",
        )
        call = ((), dict(enc))
        quality = lambda m: mean_cosine(ref, outputs(m, demo.task, held))  # noqa: E731
        metric = "cosine"
    else:
        x = torch.cat([b["x"] for b in demo.split("validation", 300, 300)])[:256]
        call = ((x,), {})
        labels = torch.cat([b["y"] for b in held])
        quality = lambda m: top1(outputs(m, demo.task, held), labels)  # noqa: E731
        metric = "top-1"
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="fcpts-speed-"))
    common = dict(score="wanda", task=demo.task, batches=calib, device="cpu")

    def add(
        label, structure, target, pruned, seconds, budget="flops", scored=None, ort=True, recon="-"
    ):
        t, o = speed(model, pruned, call, args, tmp, ort)
        q = quality(scored if scored is not None else pruned)
        rows.append(
            dict(
                case=name,
                label=label,
                structure=structure,
                budget=budget,
                target=target,
                metric=metric,
                quality=q,
                torch=t,
                ort=o,
                seconds=seconds,
                reconstruction=recon,
            )
        )
        print(rows[-1], flush=True)

    rows.append(
        dict(
            case=name,
            label="dense",
            structure="-",
            budget="-",
            target=0.0,
            metric=metric,
            quality=quality(model),
            torch=1.0,
            ort=1.0,
            seconds=0.0,
        )
    )
    for target in args.targets:
        for method in args.methods:
            label, allocator, settings, shrink = METHODS[method]
            if allocator == "fcpts":
                settings = dict(settings, iters=args.iters)
            start = time.perf_counter()
            s = shrink_to(
                model,
                target,
                budget="flops",
                method=allocator,
                settings=settings,
                **shrink,
                **common,
            )
            add(
                label,
                "units",
                target,
                s.model,
                time.perf_counter() - start,
                recon=s.reconstruction,
            )
    start = time.perf_counter()
    allocation, _ = sparsify_nm(model, 0.5, 2, 4, method="uniform", **common)
    nm = apply_allocation(model, allocation)
    add(
        "uniform 2:4 (dense kernels)",
        "2:4",
        0.5,
        nm,
        time.perf_counter() - start,
        "params",
        ort=False,
    )
    if name == "minilm":
        from fcpts.core import sparsify

        start = time.perf_counter()
        allocation = sparsify(model, 0.9, method="uniform", **common)
        masked = apply_allocation(model, allocation)
        add(
            "uniform unstructured, torch CSR",
            "unstructured",
            0.9,
            with_csr(masked),
            time.perf_counter() - start,
            "params",
            scored=masked,
            ort=False,
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| case | allocation | structure | budget | target | reconstruction | quality | torch speed-up | onnxruntime speed-up | allocate s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    f = lambda v, p="{:.2f}x": "-" if v is None else p.format(v)  # noqa: E731
    for r in rows:
        lines.append(
            f"| {r['case']} | {r['label']} | {r['structure']} | {r['budget']} | {r['target']:g} | "
            f"{r.get('reconstruction', '-')} | "
            f"{r['metric']} {r['quality']:.4f} | {f(r['torch'])} | {f(r['ort'])} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace the text between this benchmark's markers (or append the section)."""
    block = f"{BEGIN}\n{body}\n{END}"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        new = head + block + rest.split(END, 1)[1]
    else:
        new = old.rstrip("\n") + f"\n\n{TITLE}\n\n{block}\n"
    path.write_text(new)


def stored(path: Path) -> list[dict[str, Any]]:
    """The rows of the last run, from the comment :func:`section` writes."""
    text = path.read_text() if path.exists() else ""
    if ROWS not in text:
        return []
    return json.loads(text.split(ROWS, 1)[1].split("-->", 1)[0])


def section(rows: list[dict[str, Any]], args) -> str:
    return (
        f"Written by `bench/speed.py` (make bench) on {time.strftime('%Y-%m-%d')}; machine: "
        f"{machine()} (shared with other work: timings are noisy). Speed-ups are dense time / "
        f"pruned time, medians of {args.repeats} interleaved calls after {args.warmup} warm-up "
        "calls each, MiniLM at batch 16 x 64 tokens, digits at 256 images. Units rows: score "
        "wanda; every group of 16 or more units keeps a multiple of 8 (the default "
        "`--unit-multiple 8`) unless the row says any width; fcpts learns the allocation "
        "with its joint reconstruction (then a least-"
        "squares refit of the removed units' consumers only where it lowers the held-out "
        "calibration loss: the reconstruction column); uniform units either get the refit, or "
        "fcpts's joint reconstruction at the uniform allocation (thresholds not learned, same "
        f"rule for the refit), the like-for-like baseline; fcpts {args.iters} iterations, its "
        "other settings the defaults. Quality on the evaluation split (MiniLM: "
        "mean cosine to the dense embeddings, 512 sentences; digits: top-1, 300 images).\n\n"
        + table(rows)
        + f"\n\n{ROWS}{json.dumps(rows)}-->"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="minilm,digits-cnn")
    parser.add_argument("--targets", default="0.5,0.6")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    args.targets = [float(t) for t in args.targets.split(",")]
    args.methods = args.methods.split(",")
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"--methods {','.join(unknown)}: choose from {', '.join(METHODS)}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cases = args.cases.split(",")
    kept = [r for r in stored(Path(args.out)) if r["case"] not in cases]  # other cases' rows
    rows = []
    for case in cases:
        rows += case_rows(case, args)
        # after each case: partial results; the rows ride along in a comment for reruns
        write_section(Path(args.out), section(kept + rows, args))
    rows = kept + rows
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
