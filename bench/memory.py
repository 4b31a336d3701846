"""Peak memory of the block-wise allocation on a Llama-architecture model larger than the
memory bound: built from a config with random weights (its quality means nothing: this
measures memory and time only), saved shard by shard, allocated at 0.5 block-wise.

`python bench/memory.py [--hidden 2048 --intermediate 8192 --layers 24] [--iters 2]`
builds the model in one child process (never the whole model in memory: one block at a
time), allocates in a second child and reads that child's peak RSS from the operating
system (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`` and ``/proc/<pid>/status``
VmHWM); appends a section to bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"


def build(folder: Path, hidden: int, intermediate: int, layers: int, vocab: int) -> int:
    """Write the random Llama as one safetensors shard per block (plus the rest)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    torch.manual_seed(0)
    weight_map, params = {}, 0
    for b in range(layers):
        block = LlamaDecoderLayer(config, layer_idx=b)
        tensors = {f"model.layers.{b}.{k}": v.contiguous() for k, v in block.state_dict().items()}
        save_file(tensors, str(folder / f"block-{b:03d}.safetensors"))
        weight_map.update({k: f"block-{b:03d}.safetensors" for k in tensors})
        params += sum(v.numel() for v in tensors.values())
        del block, tensors
    rest = {
        "model.embed_tokens.weight": torch.randn(vocab, hidden) * 0.02,
        "model.norm.weight": torch.ones(hidden),
        "lm_head.weight": torch.randn(vocab, hidden) * 0.02,
    }
    save_file(rest, str(folder / "rest.safetensors"))
    weight_map.update({k: "rest.safetensors" for k in rest})
    params += sum(v.numel() for v in rest.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": params * 4}, "weight_map": weight_map})
    )
    return params


def allocate(
    folder: Path, out: Path, iters: int, samples: int, tokens: int, reconstruct: str
) -> dict:
    import torch

    from fcpts.blockwise import BlockwiseConfig, allocate_blockwise

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32000, (samples, tokens), generator=g)
    batches = [
        {"input_ids": ids[i : i + 4], "attention_mask": torch.ones_like(ids[i : i + 4])}
        for i in range(0, samples, 4)
    ]
    start = time.perf_counter()
    result = allocate_blockwise(
        folder,
        batches,
        0.5,
        out,
        BlockwiseConfig(iters=iters, reconstruct=reconstruct, memory_mb=64),
    )
    return {
        "seconds": time.perf_counter() - start,
        **{k: result[k] for k in ("zeros", "prunable", "exact", "achieved_sparsity")},
    }


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(args) -> None:
    if args.role == "build":
        params = build(Path(args.folder), args.hidden, args.intermediate, args.layers, 32000)
        out = {"params": params}
    else:
        out = allocate(
            Path(args.folder),
            Path(args.out),
            args.iters,
            args.samples,
            args.tokens,
            args.reconstruct,
        )
    out["vm_hwm"] = vm_hwm()
    print("RESULT " + json.dumps(out), flush=True)


def run_child(extra: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, *extra], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[7:]), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--role", choices=("build", "allocate"))
    p.add_argument("--folder", default="/tmp/fcpts-bench-llama")
    p.add_argument("--out", default="/tmp/fcpts-bench-llama-sparse")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--reconstruct", default="obs")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    if args.role:
        child(args)
        return 0
    common = [
        "--folder",
        args.folder,
        "--hidden",
        str(args.hidden),
        "--intermediate",
        str(args.intermediate),
        "--layers",
        str(args.layers),
    ]
    built, build_s = run_child(["--role", "build", *common])
    alloc, alloc_wall = run_child(
        [
            "--role",
            "allocate",
            *common,
            "--out",
            args.out,
            "--iters",
            str(args.iters),
            "--samples",
            str(args.samples),
            "--tokens",
            str(args.tokens),
            "--reconstruct",
            args.reconstruct,
        ]
    )
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    from run import machine  # bench/run.py

    gib = 1 << 30
    size = built["params"] * 4
    lines = [
        "",
        "## Block-wise memory: a random Llama-architecture model larger than the bound",
        "",
        f"Written by `bench/memory.py` on {time.strftime('%Y-%m-%d')}; machine: {machine()} (shared, timings noisy).",
        f"Model: Llama architecture from a config, random weights (quality meaningless), hidden {args.hidden}, "
        f"intermediate {args.intermediate}, {args.layers} blocks, vocabulary 32000: {built['params'] / 1e9:.2f} B parameters, "
        f"{size / gib:.2f} GiB in fp32, written shard by shard (build peak RSS {built['vm_hwm'] / gib:.2f} GiB, {build_s:.0f} s).",
        f"Allocation: `allocate_blockwise` at 0.5, {args.iters} threshold steps per block, OBS reconstruction "
        f"`{args.reconstruct}`, {args.samples} calibration sequences of {args.tokens} tokens, activations bound 64 MiB.",
        "",
        "| | value |",
        "|---|---|",
        f"| peak RSS of the allocating process (VmHWM) | {alloc['vm_hwm'] / gib:.2f} GiB |",
        f"| peak RSS of any child (getrusage) | {children_peak / gib:.2f} GiB |",
        f"| model size in fp32 | {size / gib:.2f} GiB |",
        f"| allocation wall time (s, in the child / with start-up) | {alloc['seconds']:.0f} / {alloc_wall:.0f} |",
        f"| zeros / prunable, exact | {alloc['zeros']} / {alloc['prunable']}, {alloc['exact']} |",
        "",
    ]
    with open(args.results, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
