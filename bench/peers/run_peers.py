"""llm-compressor's SparseGPT and Wanda on demo:minilm, scored exactly like bench/run.py.

llmcompressor never enters the project's venv: this script (run in the project's venv)
creates bench/.venv-peers from bench/peers/requirements.txt when it is missing or older than
that file, exports the calibration split and the model folder that fcpts's demo uses, runs
bench/peers/llmc.py in the peer venv once per method and target, loads the pruned weights
back into the dense model here and scores them on the held-out evaluation split with
fcpts.metrics (mean cosine to the dense embeddings, nearest-neighbour agreement). Sparsity is
counted from the weights over the demo's prunable layers.

Seconds: ``seconds``/``cpu_seconds`` are oneshot's own wall and CPU time inside the peer
(comparable to bench/run.py's allocation time, which excludes model loading);
``process_*`` are the whole peer process (imports, model load, writing) from
getrusage(RUSAGE_CHILDREN) deltas.

Usage: python bench/peers/run_peers.py [--methods sparsegpt,wanda] [--targets 0.5,0.7,0.8,0.9]
                                       [--out bench/peers.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from run import machine  # noqa: E402  (bench/run.py)

from fcpts.demos import load_demo  # noqa: E402
from fcpts.demos.minilm import model_dir  # noqa: E402
from fcpts.metrics import count_sparsity, mean_cosine, neighbour_agreement, outputs  # noqa: E402
from fcpts.sparse_model import round_half_up  # noqa: E402

HERE = Path(__file__).resolve().parent
VENV = HERE.parent / ".venv-peers"
REQUIREMENTS = HERE / "requirements.txt"
LLMC = HERE / "llmc.py"
# torch first and alone: a torch pulled in as a dependency would be a multi-GB CUDA build
TORCH = "torch==2.13.0"
LABELS = {
    "sparsegpt": "llm-compressor SparseGPT, uniform",
    "wanda": "llm-compressor Wanda, uniform",
}


def ensure_venv(venv: Path, requirements: Path, log) -> Path:
    """The peer venv's python; (re)installs when the stamp is older than ``requirements``."""
    python, stamp = venv / "bin" / "python", venv / ".installed"
    if stamp.is_file() and stamp.stat().st_mtime >= requirements.stat().st_mtime:
        return python
    log(f"creating {venv} from {requirements.name} (once; about 1.5 GB)")
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, TORCH], check=True)
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    check = "import torch, llmcompressor; assert not torch.version.cuda, torch.__version__"
    subprocess.run([str(python), "-c", check], check=True)
    stamp.touch()
    return python


def export_batches(batches: list[dict], path: Path) -> None:
    """Batches as one safetensors file, keys ``"<index>.<field>"`` (read by llmc.py)."""
    flat = {
        f"{i}.{name}": tensor.contiguous()
        for i, batch in enumerate(batches)
        for name, tensor in batch.items()
    }
    save_file(flat, str(path))


def unpadded(batches: list[dict]) -> list[dict]:
    """Each sentence as a batch of one without its padding: padded batches of 16 are half
    padding, which would enter llm-compressor's Hessians (SparseGPT 0.932 / 0.682 at 0.5
    instead of 0.936 / 0.717)."""
    single = []
    for batch in batches:
        for i, mask in enumerate(batch["attention_mask"]):
            n = int(mask.sum())
            single.append({k: v[i : i + 1, :n] for k, v in batch.items()})
    return single


def run_peer(command: list[str], log_path: Path) -> tuple[float, float]:
    """Runs ``command``; its wall and CPU seconds (user + system, from getrusage)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise SystemExit(f"peer run failed (exit {proc.returncode}): {' '.join(command)}\n{tail}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


@torch.no_grad()
def load_weights(dense: torch.nn.Module, path: Path) -> torch.nn.Module:
    """A copy of ``dense`` with every parameter taken from the peer's state_dict."""
    state = load_file(str(path))
    model = copy.deepcopy(dense)
    missing = [name for name, _ in model.named_parameters() if name not in state]
    if missing:
        raise SystemExit(f"{path}: the peer's state_dict lacks {missing[:3]} ...")
    for name, param in model.named_parameters():
        param.copy_(state[name].to(param.dtype))
    return model.eval()


def score(demo, held: list[dict], dense_out: torch.Tensor, sparse: torch.nn.Module) -> dict:
    layers = demo.selection.find(demo.model)
    counted = count_sparsity(sparse, layers)
    per_layer = [v["sparsity"] for v in counted["layers"].values()]
    out = outputs(sparse, demo.task, held)
    return {
        "achieved": counted["sparsity"],
        "zeros": counted["zeros"],
        "prunable": counted["prunable"],
        "layer_sparsity_min": min(per_layer),
        "layer_sparsity_max": max(per_layer),
        "quality": mean_cosine(out, dense_out),
        "nn": neighbour_agreement(dense_out, out),
    }


def measure(methods: list[str], targets: list[float], python: Path, work: Path, log) -> list:
    demo = load_demo("demo:minilm")
    calib = demo.split("calibration", demo.defaults["calibration_samples"], 16)
    held = demo.split("evaluation", demo.defaults["evaluation_samples"], 64)
    dense_out = outputs(demo.model, demo.task, held)
    calib_path = work / "calibration.safetensors"
    export_batches(unpadded(calib), calib_path)
    rows = []
    for method in methods:
        for target in targets:
            stem = work / f"{method}-{target:g}"
            command = [
                str(python),
                str(LLMC),
                "--model",
                str(model_dir()),
                "--calib",
                str(calib_path),
                "--method",
                method,
                "--target",
                str(target),
                "--weights",
                f"{stem}.safetensors",
                "--timing",
                f"{stem}.json",
                "--threads",
                str(torch.get_num_threads()),
            ]
            wall, cpu = run_peer(command, Path(f"{stem}.log"))
            timing = json.loads(Path(f"{stem}.json").read_text())
            sparse = load_weights(demo.model, Path(f"{stem}.safetensors"))
            row = {
                "case": "minilm",
                "method": LABELS[method],
                "target": target,
                **score(demo, held, dense_out, sparse),
                "seconds": timing["oneshot_wall_s"],
                "cpu_seconds": timing["oneshot_cpu_s"],
                "process_seconds": wall,
                "process_cpu_seconds": cpu,
            }
            row["exact"] = row["zeros"] == round_half_up(target * row["prunable"])
            rows.append(row)
            log(
                " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                )
            )
            Path(f"{stem}.safetensors").unlink()
    return rows


def table(rows: list[dict], targets: list[float]) -> str:
    head = "| method | " + " | ".join(f"{t:g}: cosine / NN / CPU s" for t in targets) + " |"
    lines = [head, "|---" * (len(targets) + 1) + "|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for t in targets:
            r = next((r for r in rows if r["method"] == method and r["target"] == t), None)
            cells.append(
                ""
                if r is None
                else f"{r['quality']:.3f} / {r['nn']:.3f} / {r['cpu_seconds']:.0f} "
                f"({r['process_cpu_seconds']:.0f})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    worst = max(abs(r["achieved"] - r["target"]) for r in rows)
    lines += [
        "",
        "CPU s: oneshot's own CPU seconds in the peer process (in brackets: the whole peer",
        "process, with imports and model loading). Uniform per layer, so achieved sparsity",
        f"is within {worst:.1e} of the target (exact to the weight: "
        f"{all(r['exact'] for r in rows)}).",
    ]
    return "\n".join(lines)


def parse_targets(text: str) -> list[float]:
    targets = [float(t) for t in text.split(",")]
    if not all(0 < t < 1 for t in targets):
        raise ValueError(text)
    return targets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--methods", default="sparsegpt,wanda")
    parser.add_argument("--targets", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--venv", default=str(VENV))
    parser.add_argument(
        "--results",
        default=None,
        help="also write the table as its own section of this Markdown file (bench/RESULTS.md), "
        "keeping the file's other sections",
    )
    parser.add_argument(
        "--from-json",
        default=None,
        help="measure nothing: render the rows a run wrote with --out",
    )
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in LABELS]:
        parser.error(f"--methods {','.join(unknown)}: choose from {','.join(LABELS)}")
    try:
        targets = parse_targets(args.targets)
    except ValueError:
        parser.error(f"--targets {args.targets!r}: comma-separated numbers between 0 and 1")
    torch.set_num_threads(min(torch.get_num_threads(), os.cpu_count() or 1))

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    if args.from_json:
        payload = json.loads(Path(args.from_json).read_text())
        rows = payload["rows"]
    else:
        python = ensure_venv(Path(args.venv), REQUIREMENTS, log)
        with tempfile.TemporaryDirectory(prefix="fcpts-peers-") as work:
            rows = measure(methods, targets, python, Path(work), log)
        payload = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    text = table(rows, targets)
    print(f"machine: {payload['machine']}\n\n{text}")
    if args.out:
        Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    if args.results:
        write_section(Path(args.results), payload, text)
    return 0


SECTION = "## Peers: llm-compressor on all-MiniLM-L6-v2 (held-out cosine / NN / CPU s)"


def write_section(path: Path, payload: dict, text: str) -> None:
    """Replace (or add) this benchmark's section of ``path``; other sections stay."""
    body = (
        f"{SECTION}\n\nWritten by `bench/peers/run_peers.py` (make bench) on {payload['date']}; "
        f"machine: {payload['machine']}. llm-compressor 0.14.0.1 in its own venv "
        '(bench/.venv-peers), `oneshot` with `sequential_targets=["BertLayer"]`, '
        '`targets=["Linear"]`, `ignore=["re:.*pooler.*"]`, on the same 512 calibration '
        "sentences (sent unpadded: padded positions would enter its Hessians) and scored on "
        "the same 512 held-out sentences with fcpts.metrics.\n\n" + text + "\n"
    )
    old = path.read_text() if path.exists() else ""
    parts, current = [], None
    for line in old.splitlines(keepends=True):
        if line.startswith("## "):
            current = line.rstrip("\n")
            parts.append([current, line])
        elif parts:
            parts[-1][1] += line
        else:
            parts.append([None, line])
    kept = [text_ for title, text_ in parts if title != SECTION]
    path.write_text("".join(kept).rstrip("\n") + "\n\n" + body)


if __name__ == "__main__":
    raise SystemExit(main())
