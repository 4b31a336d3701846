"""MiniLM's 2:4 and units speed-ups on a CUDA GPU, measured once; writes its section of
bench/RESULTS.md (the other sections stay as they are).

Run on a machine with a GPU: ``python bench/gpu_speed.py`` (about a minute on an H200;
well under 5). ``--device cpu`` runs the same comparisons on the CPU engines as a quick
smoke test (``--quick`` makes it shorter still); give ``--results`` another file then, so
that bench/RESULTS.md keeps the GPU figures.

Variants of all-MiniLM-L6-v2 (pruned by weight magnitude, no reconstruction: this is about
speed; bench/speed.py has the learned allocations and their quality):

* 2:4: every encoder Linear keeps the 2 largest of each 4 consecutive input weights; on
  CUDA timed dense fp16 vs ``torch.sparse.to_sparse_semi_structured`` fp16 (engine
  ``cuda-2to4``) and in eager fp32 (``cuda``: the zeros alone, no sparse kernel);
* units: FFN neurons (and attention heads) removed physically by ``fcpts.structure``,
  a smaller dense model.

Every row is dense and pruned timed interleaved in one process, medians of ``--repeats``
runs (:func:`fcpts.speed.compare`), on batches of sentences padded to a fixed length.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from run import machine as cpu_machine  # bench/run.py
from sweep_minilm import write_section  # bench/sweep_minilm.py
from torch import nn

from fcpts import speed
from fcpts.demos import load_demo
from fcpts.demos import text as demo_text
from fcpts.structure.shrink import shrink
from fcpts.structure.units import find_units

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADING = {
    "cuda": "## Speed on CUDA: MiniLM 2:4 and units (bench/gpu_speed.py)",
    "cpu": "## Speed smoke test on the CPU: MiniLM 2:4 and units (bench/gpu_speed.py --device cpu)",
}


def two_four(model: nn.Module) -> nn.Module:
    """A copy whose encoder Linear weights keep the 2 largest |w| of every 4 inputs."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, m in out.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("encoder.") and m.in_features % 4 == 0:
                w = m.weight.reshape(m.out_features, -1, 4)
                drop = w.abs().argsort(-1)[..., :2]
                w.scatter_(-1, drop, 0.0)
    return out


def without_units(model: nn.Module, ffn: float, heads: float) -> nn.Module:
    """A copy without the fraction ``ffn`` of each layer's FFN neurons and ``heads`` of its
    attention heads, the smallest by the L2 norm of their weights."""
    units = find_units(model)
    state = model.state_dict()
    keep = {}
    for group in units.groups:
        share = ffn if group.kind == "neuron" else heads
        norm = torch.zeros(group.count)
        for m in group.members:
            t = state[m.tensor].float()
            t = t.movedim(m.axis, 0).reshape(group.count, m.width, -1)
            norm += t.pow(2).sum((1, 2))
        kept = group.count - int(round(share * group.count))
        k = torch.zeros(group.count, dtype=torch.bool)
        k[norm.argsort(descending=True)[: max(kept, 1)]] = True
        keep[group.name] = k
    return shrink(model, units, keep)


def fixed_batch(demo, sentences: int, tokens: int) -> dict[str, torch.Tensor]:
    """``sentences`` held-out sentences padded (or cut) to exactly ``tokens`` tokens."""
    corpus = demo_text.sentences()
    picked = demo_text.split(corpus, "evaluation", sentences)
    enc = demo.tokenizer(
        picked, padding="max_length", truncation=True, max_length=tokens, return_tensors="pt"
    )
    return dict(enc)


def cosine(dense: nn.Module, pruned: nn.Module, batch) -> float:
    def embed(net):
        with torch.inference_mode():
            hidden = net(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    return float((embed(dense) * embed(pruned)).sum(-1).mean())


def machine(device: str) -> str:
    if device == "cuda":
        return (
            f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    return cpu_machine()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--batches", default="16x64,64x128", help="SENTENCESxTOKENS, comma-separated")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="one batch, 3 repeats, fewer variants")
    p.add_argument("--results", default=str(RESULTS), help="Markdown file to write the section to")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU is visible: run with --device cpu for the CPU smoke test")
    start = time.perf_counter()
    demo = load_demo("demo:minilm")
    dense = demo.model.eval()
    variants = {
        "2:4 (every encoder Linear)": two_four(dense),
        "units: 1/2 FFN neurons": without_units(dense, 0.5, 0.0),
        "units: 3/4 FFN neurons": without_units(dense, 0.75, 0.0),
        "units: 1/2 heads + 3/4 FFN neurons": without_units(dense, 0.75, 0.5),
    }
    batches = args.batches.split(",")
    repeats = args.repeats
    if args.quick:
        batches, repeats = batches[:1], 3
        variants = dict(list(variants.items())[::3])
    engines = ("cuda",) if args.device == "cuda" else ("torch", "onnxruntime")
    rows = []
    for shape in batches:
        n, tokens = (int(v) for v in shape.lower().split("x"))
        batch = fixed_batch(demo, n, tokens)
        for label, pruned in variants.items():
            result = speed.compare(
                dense,
                pruned,
                batch,
                engines=engines,
                repeats=repeats,
                warmup=3,
                device=args.device,
            )
            cos = cosine(dense, pruned, batch)
            for engine, r in result["engines"].items():
                rows.append(
                    f"| {label} | {n} x {tokens} | {engine} ({r.get('dtype', 'float32')}) | "
                    f"{r['dense_ms']:.2f} | {r['pruned_ms']:.2f} | **{r['ratio']:.2f}x** | "
                    f"{r['dense_iqr_ms']:.2f} / {r['pruned_iqr_ms']:.2f} | {r['repeats']} | {cos:.3f} |"
                )
                print(rows[-1], flush=True)
            for engine, reason in result["skipped"].items():
                rows.append(f"| {label} | {n} x {tokens} | {engine} | skipped: {reason} ||||||")
                print(rows[-1], flush=True)
    heading = HEADING[args.device]
    section = "\n".join(
        [
            heading,
            "",
            f"Written by bench/gpu_speed.py on {time.strftime('%Y-%m-%d')} in "
            f"{time.perf_counter() - start:.0f} s; machine: {machine(args.device)}. "
            "all-MiniLM-L6-v2 pruned by weight magnitude without reconstruction (the cosine "
            "is to the dense embeddings on the timed batch; bench/speed.py has the learned "
            "allocations' quality). Dense and pruned timed interleaved, medians; speed-up = "
            "dense / pruned time; spread = interquartile ranges. cuda-2to4: both models in "
            "float16, the pruned one's 2:4 weights as torch semi-structured sparse tensors.",
            "",
            "| variant | batch (sentences x tokens) | engine | dense ms | pruned ms | speed-up "
            "| spread ms (dense / pruned) | runs | cosine |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    write_section(section, Path(args.results), heading)
    print(f"wrote the section {heading!r} of {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
