"""Hugging Face decoder folders: which ones are causal LMs, and loading them offline.

A folder is a causal LM when its ``config.json`` names an architecture ending in
``ForCausalLM`` or ``LMHeadModel`` (GPT-2, Llama, Qwen2, Mistral, Phi, ...). Models that
need remote code are refused: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..core import LayerSelection
from ..errors import UserError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# the output head is tied to the input embedding in most decoders and is left dense (as
# SparseGPT and Wanda do): only the decoder blocks' linear layers are pruned
CAUSAL_SELECTION = LayerSelection(exclude=("lm_head",))


def causal_architecture(folder: str | os.PathLike) -> str | None:
    """The causal-LM architecture ``config.json`` names, or None for any other model."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    for arch in config.get("architectures") or []:
        if str(arch).endswith(CAUSAL_SUFFIXES):
            return str(arch)
    return None


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
