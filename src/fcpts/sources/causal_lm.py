"""Hugging Face decoder folders: which ones are causal LMs, and loading them offline.

A folder is a causal LM when its ``config.json`` names an architecture ending in
``ForCausalLM`` or ``LMHeadModel`` (GPT-2, Llama, Qwen2, Mistral, Phi, ...). Models that
need remote code are refused: ``trust_remote_code`` stays off.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..core import LayerSelection

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
