"""Decoder rows: fcpts vs Wanda and SparseGPT (uniform and with OWL ratios) on
demo:gpt2-tiny at 0.5 and 0.7, side by side in one run; writes a section of
bench/RESULTS.md.

`python bench/decoder.py [--targets 0.5,0.7] [--iters 200]`. Every method gets the same
calibration blocks and is scored on the same held-out evaluation blocks (perplexity,
next-token top-1 agreement and KL against the dense model, :mod:`fcpts.lm_metrics`).
Wanda and SparseGPT are fcpts's own implementations (per-layer exact counts; landing
makes every method exact).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from run import machine  # bench/run.py

from fcpts.blockwise import BlockwiseConfig, allocate_blockwise
from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.demos.gpt2 import model_dir
from fcpts.lm_metrics import lm_quality
from fcpts.metrics import outputs
from fcpts.sparse_model import apply_allocation

HERE = Path(__file__).resolve().parent
BLOCKS = ("transformer.h.*",)


def variants(iters: int) -> list[tuple[str, str, str, dict]]:
    """(label, method, score, settings)."""
    return [
        ("Wanda, uniform", "uniform", "wanda", {}),
        ("Wanda, OWL ratios", "owl", "wanda", {}),
        ("SparseGPT, uniform", "sparsegpt", "wanda", {"blocks": BLOCKS}),
        ("SparseGPT, OWL ratios", "sparsegpt", "wanda", {"blocks": BLOCKS, "allocation": "owl"}),
        ("fcpts (joint reconstruction)", "fcpts", "wanda", {"iters": iters}),
    ]


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--targets", default="0.5,0.7")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    args = p.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    demo = load_demo("demo:gpt2-tiny")
    calib = demo.split("calibration", demo.defaults["calibration_samples"], 8)
    held = demo.split("evaluation", demo.defaults["evaluation_samples"], 16)
    dense = outputs(demo.model, demo.task, held)
    dense_ppl = lm_quality(dense, dense, held)["dense"]
    rows = {}
    for label, method, score, settings in variants(args.iters):
        for target in targets:
            start = time.perf_counter()
            alloc = sparsify(
                demo.model,
                target,
                method=method,
                score=score,
                task=demo.task,
                batches=calib,
                selection=demo.selection,
                settings=settings,
                device="cpu",
            )
            seconds = time.perf_counter() - start
            q = lm_quality(
                dense, outputs(apply_allocation(demo.model, alloc), demo.task, held), held
            )
            rows[(label, target)] = (
                q,
                alloc.achieved,
                alloc.zeros == round(target * alloc.prunable),
                seconds,
            )
            print(label, target, f"{q['sparse']:.2f}", f"{seconds:.0f}s", flush=True)
    for target in targets:  # the block-wise path on the same model and data
        out = Path(f"/tmp/fcpts-bench-gpt2-bw-{target}")
        start = time.perf_counter()
        res = allocate_blockwise(
            model_dir(), calib, target, out, BlockwiseConfig(iters=args.iters // 4)
        )
        seconds = time.perf_counter() - start
        from transformers import AutoModelForCausalLM

        net = AutoModelForCausalLM.from_pretrained(str(out)).eval()
        q = lm_quality(dense, outputs(net, demo.task, held), held)
        rows[("fcpts block-wise (OBS per block)", target)] = (
            q,
            res["achieved_sparsity"],
            res["exact"],
            seconds,
        )
        print("blockwise", target, f"{q['sparse']:.2f}", flush=True)
    labels = list(dict.fromkeys(label for label, _ in rows))
    lines = [
        "",
        "## Decoder: demo:gpt2-tiny, fcpts vs Wanda and SparseGPT (held-out perplexity)",
        "",
        f"Written by `bench/decoder.py` on {time.strftime('%Y-%m-%d')}; machine: {machine()} (shared, timings noisy).",
        f"demo:gpt2-tiny (GPT-2 architecture, 4 blocks of width 128, trained here on stdlib prose); "
        f"{sum(b['input_ids'].numel() for b in calib)} calibration tokens, {sum(b['input_ids'].numel() for b in held)} "
        f"held-out tokens; dense perplexity {dense_ppl:.2f}. Cells: perplexity / top-1 agreement / KL to dense / wall s; "
        "every row exact to the weight unless marked.",
        "",
        "| method | " + " | ".join(f"{t}" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
    ]
    for label in labels:
        cells = []
        for t in targets:
            q, achieved, exact, seconds = rows[(label, t)]
            sec = q["secondary"]
            cells.append(
                f"{q['sparse']:.2f} / {sec['top1_agreement']['sparse']:.3f} / {sec['kl_to_dense']['sparse']:.3f} / {seconds:.0f}"
                + ("" if exact else f" (achieved {achieved:.6f})")
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    with open(args.results, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
