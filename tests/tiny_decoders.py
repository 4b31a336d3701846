"""Tiny decoders built from a config with random weights (their quality means nothing;
they exercise the causal-LM path), with a byte-level BPE tokenizer trained on stdlib text."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch

VOCAB = 320


def corpus_text() -> str:
    """A few hundred KB of English from the standard library's own docstrings."""
    import argparse
    import collections
    import email
    import json
    import logging
    import pathlib
    import subprocess
    import textwrap
    import unittest

    docs = []
    for module in (
        argparse,
        collections,
        email,
        json,
        logging,
        pathlib,
        subprocess,
        textwrap,
        unittest,
    ):
        docs.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if inspect.isclass(obj) or inspect.isfunction(obj):
                docs.append(inspect.getdoc(obj) or "")
    return "\n\n".join(d for d in docs if d)


def tokenizer(folder: Path, text: str):
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
    tok.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(folder))
    return fast


def build(arch: str, folder: Path, *, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a tiny ``llama`` or ``gpt2`` (random weights) with a tokenizer to ``folder``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    if arch == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    else:
        config = GPT2Config(
            vocab_size=VOCAB,
            n_embd=hidden,
            n_layer=layers,
            n_head=4,
            n_positions=256,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder))
    text = corpus_text()
    tokenizer(folder, text)
    (folder.parent / f"{folder.name}.txt").write_text(text)
    return folder


def cli_allocate(folder: Path, text: Path, out: Path, *extra) -> list:
    """The arguments of a quick ``fcpts allocate`` at 0.5 of a tiny decoder on the CPU."""
    quick = "--target 0.5 --device cpu --calibration-samples 8 --batch-size 4".split()
    return ["allocate", "--model", folder, "--data", text, *quick, "--out", out, *extra]


def cli_evaluate(folder: Path, text: Path, sparse: Path, out: Path, *extra) -> list:
    """The arguments of a quick ``fcpts evaluate`` of ``sparse`` against the tiny decoder."""
    quick = "--evaluation-samples 8 --latency-seconds 0.05".split()
    head = ["evaluate", "--model", folder, "--data", text, "--sparse", sparse]
    return [*head, *quick, "--out", out, *extra]
