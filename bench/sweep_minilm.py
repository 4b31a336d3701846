"""Sweep benchmark: does `fcpts sweep` find settings for MiniLM at 0.8 that beat the defaults?

Runs `fcpts sweep` on demo:minilm at target 0.8 (timed), then allocates with the library
defaults and with the sweep's best settings (`fcpts allocate --config OUT/allocate.json`)
and evaluates both with `fcpts evaluate` on the held-out evaluation split, which neither
the sweep's objective (validation split) nor the allocator (calibration split) has seen.
Prints a table and writes the "## Sweep: MiniLM at 0.8" section of bench/RESULTS.md,
leaving the other sections as they are.

Usage:
  python bench/sweep_minilm.py [--trials 8] [--out runs/sweep-minilm-0.8]
  python bench/sweep_minilm.py --resume --trials 4     # N more trials of the same study
  python bench/sweep_minilm.py --skip-sweep            # only the held-out runs, on OUT
  python bench/sweep_minilm.py --render-only           # the section from what OUT holds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = "## Sweep: MiniLM at 0.8"
MODEL = "demo:minilm"
TARGET = 0.8
SAMPLES = ["--calibration-samples", "512", "--batch-size", "16"]
SPACE = [
    "iters=200:400",
    "weight_lr=0.005:0.05",  # relative to each parameter's RMS (the default step)
    "lam=0.5:2",
    "lr=0.03:0.1",
    "ste_width=1:1",
    "score=wanda",
]
RUNS_FILE = "bench_runs.json"


def fcpts() -> str:
    found = Path(sys.executable).with_name("fcpts")
    return str(found) if found.exists() else "fcpts"


def run(cmd: list[str]) -> float:
    print("$ " + shlex.join(cmd), flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    return time.perf_counter() - start


def sweep_command(out: Path, trials: int, validation_samples: int) -> list[str]:
    cmd = [fcpts(), "sweep", "--model", MODEL, "--target", str(TARGET), "--trials", str(trials)]
    cmd += SAMPLES + ["--validation-samples", str(validation_samples)]
    for item in SPACE:
        cmd += ["--space", item]
    return cmd + ["--out", str(out)]


def held_out(out: Path, name: str, allocate_args: list[str]) -> dict:
    """Allocate, then evaluate on the evaluation split; the metrics and allocate seconds."""
    sparse, report = out / "heldout" / name, out / "heldout" / f"{name}-eval"
    seconds = run(
        [fcpts(), "allocate", *allocate_args, "--no-tracking", "--quiet", "--out", str(sparse)]
    )
    run(
        [fcpts(), "evaluate", "--model", MODEL, "--sparse", str(sparse), "--out", str(report)]
        + ["--no-tracking", "--quiet"]
    )
    metrics = json.loads((report / "metrics.json").read_text())
    manifest = json.loads((sparse / "manifest.json").read_text())
    return {
        "allocate_command_seconds": round(seconds, 1),
        "metrics": metrics,
        "achieved_sparsity": manifest["achieved_sparsity"],
        "settings": manifest.get("settings"),
    }


def machine() -> str:
    import torch

    cpu = platform.machine()
    accel = "CUDA GPU" if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()}-core {cpu} CPU, {accel}, torch {torch.__version__}"


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render(out: Path) -> str:
    runs = json.loads((out / RUNS_FILE).read_text())
    best = json.loads((out / "best.json").read_text())
    base = best["baseline"]
    trials = best["trials"]
    evals = {
        name: json.loads((out / "heldout" / f"{name}.json").read_text())
        for name in ("defaults", "best")
    }

    def cos(name: str) -> float:
        return evals[name]["metrics"]["sparse"]

    def nn(name: str) -> float:
        return evals[name]["metrics"]["secondary"]["nn_agreement"]["sparse"]

    wall = sum(r["seconds"] for r in runs["sweeps"])
    beats = cos("best") > cos("defaults")
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best["params"].items() if k != "seed")
    lines = [
        HEADING,
        "",
        f"Written by `bench/sweep_minilm.py` on {runs['date']}; machine: {runs['machine']}.",
        "The sweep's objective is the mean cosine to the dense embeddings on the validation",
        "split; the held-out columns are `fcpts evaluate` on the evaluation split (disjoint from",
        "calibration and validation) after `fcpts allocate` with the defaults and with",
        "`--config OUT/allocate.json`. Trial 0 of the study runs the defaults (the baseline).",
        "",
    ]
    for r in runs["sweeps"]:
        command = shlex.join(["fcpts", *r["command"]]).replace(str(Path.cwd()) + "/", "")
        lines += ["```sh", command, "```", ""]
    lines += [
        "| | defaults | best (trial {}) |".format(best["trial"]),
        "|---|---|---|",
        f"| validation cosine (sweep objective, {best['splits']['objective']['samples']} samples) "
        f"| {base['value']:.4f} | {best['value']:.4f} |",
        f"| held-out cosine ({evals['best']['metrics']['evaluation']['samples']} samples) "
        f"| {cos('defaults'):.4f} | {cos('best'):.4f} |",
        f"| held-out nearest-neighbour agreement | {nn('defaults'):.4f} | {nn('best'):.4f} |",
        "| settings (lam / lr / weight_lr / iters) | "
        + " | ".join(
            " / ".join(_fmt(evals[n]["settings"][k]) for k in ("lam", "lr", "weight_lr", "iters"))
            for n in ("defaults", "best")
        )
        + " |",
        f"| achieved sparsity | {evals['defaults']['achieved_sparsity']:.6f} "
        f"| {evals['best']['achieved_sparsity']:.6f} |",
        f"| allocate wall time (s, incl. loading and calibration) "
        f"| {evals['defaults']['allocate_command_seconds']:.0f} "
        f"| {evals['best']['allocate_command_seconds']:.0f} |",
        "",
        f"- sweep wall time: {wall / 60:.1f} min ("
        + " + ".join(f"{r['seconds']:.0f} s for {r['trials']} trials" for r in runs["sweeps"])
        + ")",
        f"- trials: {trials['total']} total, {trials['complete']} complete "
        f"({trials['infeasible']} of them off target), {trials['pruned']} pruned, "
        f"{trials['fail']} failed",
        f"- best settings: score {best['score']}, {params}",
        f"- held-out: the best settings {'beat' if beats else 'do not beat'} the defaults by "
        f"{cos('best') - cos('defaults'):+.4f} cosine",
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str, path: Path = RESULTS, heading: str = HEADING) -> None:
    """Replace the section (up to the next ``## `` heading) or append it."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = "".join(lines[end:])
    path.write_text("".join(lines[:start]) + section + ("\n" + tail if tail else ""))


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--validation-samples", type=int, default=256)
    p.add_argument("--out", default="runs/sweep-minilm-0.8")
    p.add_argument("--resume", action="store_true", help="run --trials more trials of the study")
    p.add_argument("--skip-sweep", action="store_true", help="held-out runs on OUT as it is")
    p.add_argument("--render-only", action="store_true")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = Path(args.out).absolute()
    if not (args.render_only or args.skip_sweep):
        if args.resume:
            runs = json.loads((out / RUNS_FILE).read_text())
        else:
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            runs = {"sweeps": []}
        cmd = sweep_command(out, args.trials, args.validation_samples)
        seconds = run(cmd)
        runs["sweeps"].append(
            {"command": cmd[1:], "seconds": round(seconds, 1), "trials": args.trials}
        )
        runs["date"] = time.strftime("%Y-%m-%d", time.gmtime())
        runs["machine"] = machine()
        (out / RUNS_FILE).write_text(json.dumps(runs, indent=1))
    if not args.render_only:
        best = json.loads((out / "best.json").read_text())
        samples = SAMPLES + ["--seed", str(best["seed"])]
        plain = ["--model", MODEL, "--target", str(TARGET), "--method", "fcpts", *samples]
        for name, allocate_args in (
            ("defaults", plain),
            ("best", ["--config", str(out / "allocate.json")]),
        ):
            result = held_out(out, name, allocate_args)
            (out / "heldout" / f"{name}.json").write_text(json.dumps(result, indent=1))
    section = render(out)
    print(section)
    write_section(section, Path(args.results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
