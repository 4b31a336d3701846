"""One llm-compressor peer run; runs inside bench/.venv-peers, never in the project's venv.

Reads the calibration batches that bench/peers/run_peers.py exported (safetensors, keys
``"<batch>.<field>"``), prunes the MiniLM encoder in ``--model`` uniformly to ``--target``
with llm-compressor's SparseGPT or Wanda, and writes the pruned model's state_dict
(safetensors) plus the seconds oneshot took (JSON). Scoring happens in the project's venv,
with the project's metric code.

Usage: python llmc.py --model DIR --calib FILE --method sparsegpt|wanda --target 0.8
                      --weights OUT.safetensors --timing OUT.json [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def read_batches(path: str) -> list[dict[str, torch.Tensor]]:
    """The exported batches in their original order, each a dict of tensors."""
    flat = load_file(path)
    batches: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in flat.items():
        index, field = key.split(".", 1)
        batches.setdefault(int(index), {})[field] = tensor
    return [batches[i] for i in sorted(batches)]


def modifier(method: str, target: float):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    return cls(sparsity=target, mask_structure="0:0", targets=["Linear"], ignore=["re:.*pooler.*"])


def prune(model_dir: str, batches: list[dict], method: str, target: float) -> tuple:
    from llmcompressor import oneshot
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir).eval()
    # batch_size=None: the exported batches go in as they are
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    wall, cpu = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,
        dataset=loader,
        recipe=modifier(method, target),
        sequential_targets=["BertLayer"],
        num_calibration_samples=sum(len(b["input_ids"]) for b in batches),
        output_dir=None,
    )
    return model, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--calib", required=True)
    parser.add_argument("--method", choices=("sparsegpt", "wanda"), required=True)
    parser.add_argument("--target", type=float, required=True)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--timing", required=True)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, wall, cpu = prune(args.model, read_batches(args.calib), args.method, args.target)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.weights)
    with open(args.timing, "w") as fh:
        json.dump(
            {
                "oneshot_wall_s": wall,
                "oneshot_cpu_s": cpu,
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            },
            fh,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
