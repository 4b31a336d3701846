"""Text for decoders: a UTF-8 file tokenised once and cut into fixed-length token blocks.

The whole file is tokenised as one stream (no special tokens) and cut into blocks of
``BLOCK_TOKENS`` tokens (or the model's context, if shorter); the tail shorter than a
block is dropped. Blocks are the samples: they are split in thirds by the seeded
permutation every data source uses (:func:`fcpts.sources.data.split_indices`), so
calibration and evaluation never share a block. A batch is
``{"input_ids": (b, L), "attention_mask": ones (b, L)}``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from ..tasks import is_causal_lm
from .data import TENSOR_SUFFIXES
from .data import resolve_data as resolve_any_data
from .files import local_path
from .models import ResolvedModel
from .spec import SPLITS, Sources
from .splits import DataSource, split_indices

BLOCK_TOKENS = 128


def block_length(model: ResolvedModel) -> int:
    """``BLOCK_TOKENS``, or the model's context length when that is shorter."""
    config = getattr(model.model, "config", None)
    context = getattr(config, "max_position_embeddings", None) or getattr(
        config, "n_positions", None
    )
    return min(BLOCK_TOKENS, int(context)) if context else BLOCK_TOKENS


def token_blocks(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """``tokens`` (1-D) cut into whole blocks of ``length``: (blocks, length)."""
    n = tokens.numel() // length
    return tokens[: n * length].reshape(n, length).contiguous()


def batches_of(blocks: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Token blocks as batches with an all-ones attention mask."""
    return [
        {
            "input_ids": blocks[i : i + batch_size].contiguous(),
            "attention_mask": torch.ones_like(blocks[i : i + batch_size]),
        }
        for i in range(0, blocks.shape[0], batch_size)
    ]


def text_blocks(path: Path, spec: str, model: ResolvedModel) -> DataSource:
    """A text file as a data source of token blocks for ``model``'s tokenizer."""
    if model.tokenizer is None:
        raise UserError(
            f"text data {spec} needs the decoder's tokenizer, and {model.source} has none "
            "(no tokenizer.json in the folder): save the tokenizer beside the model"
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{spec} is not a UTF-8 text file") from None
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    length = block_length(model)
    blocks = token_blocks(torch.tensor(ids, dtype=torch.long), length)
    if blocks.shape[0] < 3:
        raise UserError(
            f"text file {spec} holds {len(ids)} tokens, fewer than 3 blocks of {length}: "
            "give more text (each split gets a third of the blocks)"
        )

    def load(name: str, n: int, batch_size: int, seed: int, exact: bool = False) -> list[Any]:
        idx = split_indices(blocks.shape[0], name, seed)[:n]
        if exact and len(idx) < n:
            raise UserError(
                f"--data: the {name} split of {spec} holds {len(idx)} blocks of {length} "
                f"tokens, fewer than the {n} asked for: give more text or ask for fewer samples"
            )
        return batches_of(blocks[torch.tensor(idx, dtype=torch.long)], batch_size)

    return DataSource(
        source=spec,
        kind="lm-text",
        samples=int(blocks.shape[0]),
        has_labels=False,
        digest=hashlib.sha256(raw).hexdigest(),
        _loader=load,
    )


def resolve_data(
    sources: Sources, model: ResolvedModel, primary: str = "calibration"
) -> DataSource:
    """:func:`fcpts.sources.data.resolve_data`, except that a text file given with a
    Hugging Face decoder becomes token blocks split in thirds (see the module's docstring)."""
    if model is None or not (model.kind == "huggingface" and is_causal_lm(model.model)):
        return resolve_any_data(sources, model, primary)
    own = [name for name in SPLITS if sources.split_source(name)[0] != "--data"]
    if own:
        raise UserError(
            f"--{own[0]}-data: a decoder's text is cut into token blocks that the splits "
            "share in thirds; give one text file with --data instead"
        )
    spec = sources.data.strip() if sources.data else None
    if spec:
        path = local_path(spec)
        if path.is_file() and path.suffix not in TENSOR_SUFFIXES:
            return text_blocks(path, spec, model)
    return resolve_any_data(sources, model, primary)
