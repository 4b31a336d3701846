"""Wall time of the default fcpts variant on MiniLM; writes bench/TIMING.md.

Run it on a quiet machine: `python bench/timing.py [--targets 0.8,0.9] [--repeats 2]`.
The time covers scoring (with the calibration pass for wanda), learning and exact landing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from run import machine  # bench/run.py

from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.metrics import mean_cosine, outputs
from fcpts.sparse_model import apply_allocation

OUT = Path(__file__).resolve().parent / "TIMING.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--targets", default="0.8,0.9")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args(argv)
    demo = load_demo("demo:minilm")
    calib = demo.split(
        "calibration", demo.defaults["calibration_samples"], demo.defaults["batch_size"]
    )
    held = demo.split("evaluation", demo.defaults["evaluation_samples"], 64)
    dense = outputs(demo.model, demo.task, held)
    lines = [
        "# fcpts default variant on all-MiniLM-L6-v2: wall time",
        "",
        f"Written by bench/timing.py on {time.strftime('%Y-%m-%d')}; machine: {machine()}.",
        f"{len(calib)} calibration batches of {demo.defaults['batch_size']} sentences; "
        f"held-out mean cosine on {demo.defaults['evaluation_samples']} disjoint sentences.",
        "",
        "| target | held-out cosine | wall seconds (each run) | median |",
        "|---|---|---|---|",
    ]
    for target in [float(t) for t in args.targets.split(",")]:
        times, cos = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            alloc = sparsify(
                demo.model,
                target,
                task=demo.task,
                batches=calib,
                selection=demo.selection,
                device="cpu",
            )
            times.append(time.perf_counter() - start)
            cos = mean_cosine(outputs(apply_allocation(demo.model, alloc), demo.task, held), dense)
        lines.append(
            f"| {target:g} | {cos:.3f} | {', '.join(f'{t:.0f}' for t in times)} | {statistics.median(times):.0f} |"
        )
        print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
