"""demo:gpt2-tiny: a small GPT-2-architecture decoder trained here on stdlib prose.

No pretrained decoder ships inside a package this machine can install, so the demo trains
one on first use: the prose sentences of Python's own docstrings (:mod:`.text`), a
byte-level BPE tokenizer of ``VOCAB`` tokens, 4 blocks of width 128 (about 1 M
parameters), a few minutes on 2 CPU cores. The result is cached as a Hugging Face folder
(model and tokenizer: it loads with ``AutoModelForCausalLM.from_pretrained``) under
$XDG_CACHE_HOME/fcpts (or ~/.cache/fcpts). The sentences are split by position: the first
60% train the model, and the last 40% are cut in thirds for calibration, validation and
evaluation, so no split was seen in training.
"""

from __future__ import annotations

import os
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..core import LayerSelection
from ..errors import UserError
from ..tasks import CausalLMTask
from . import text
from .base import Demo
from .digits import cache_dir

VERSION = "gpt2-tiny-v1"
VOCAB = 1024
BLOCK = 128
TRAIN_FRACTION = 0.6
SEED = 0


def split_text(name: str) -> str:
    """The prose of one split (train, calibration, validation, evaluation) as one text."""
    corpus = text.sentences()
    cut = int(len(corpus) * TRAIN_FRACTION)
    held = corpus[cut:]
    third = len(held) // 3
    parts = {
        "train": corpus[:cut],
        "calibration": held[:third],
        "validation": held[third : 2 * third],
        "evaluation": held[2 * third :],
    }
    if name not in parts:
        raise ValueError(f"split must be one of {tuple(parts)}")
    return " ".join(parts[name])


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([split_text("train")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


def blocks_of(tokenizer, name: str) -> torch.Tensor:
    """The split's text as whole blocks of BLOCK tokens: (blocks, BLOCK)."""
    ids = torch.tensor(tokenizer(split_text(name), add_special_tokens=False)["input_ids"])
    n = ids.numel() // BLOCK
    return ids[: n * BLOCK].reshape(n, BLOCK)


def train(folder: Path, steps: int = 1200, batch_size: int = 16) -> None:
    """Train the tokenizer and the model; save both to ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _train_tokenizer(folder)
    torch.manual_seed(SEED)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=BLOCK,
        n_embd=128,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config)
    data = blocks_of(tokenizer, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    g = torch.Generator().manual_seed(SEED)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, data.shape[0], (batch_size,), generator=g)
        loss = model(input_ids=data[idx], labels=data[idx]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval().save_pretrained(str(folder))


def model_dir() -> Path:
    """The cached demo folder, trained first if absent (written whole, then renamed)."""
    folder = cache_dir() / VERSION
    if (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file():
        return folder
    tmp = folder.with_name(f"{VERSION}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train(tmp)
    if folder.exists() and not (folder / "config.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)  # a partial folder of an older version
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: its folder is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _split(tokenizer, name: str, n: int, batch_size: int) -> list[dict[str, Any]]:
    blocks = blocks_of(tokenizer, name)[:n]
    return [
        {
            "input_ids": blocks[i : i + batch_size],
            "attention_mask": torch.ones_like(blocks[i : i + batch_size]),
        }
        for i in range(0, blocks.shape[0], batch_size)
    ]


def load_causal_lm(folder: str | os.PathLike) -> tuple[Any, Any]:
    """An ``AutoModelForCausalLM`` model in fp32 and its tokenizer (None when the folder
    holds none) from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype="float32").eval()
    except ValueError as exc:
        raise UserError(f"cannot load the decoder in {folder}: {exc}") from None
    model.config.use_cache = False  # calibration and evaluation keep no key/value cache
    tokenizer = None
    if any((Path(folder) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    return model, tokenizer


def load() -> Demo:
    model, tokenizer = load_causal_lm(model_dir())
    return Demo(
        name="gpt2-tiny",
        model=model,
        task=CausalLMTask(),
        split=partial(_split, tokenizer),
        selection=LayerSelection(exclude=("lm_head",)),
        defaults={"calibration_samples": 64, "evaluation_samples": 96, "batch_size": 8},
        tokenizer=tokenizer,
    )
