"""Decoder quality against the dense model: held-out perplexity, next-token top-1
agreement and KL(dense || sparse) of the next-token distributions.

Logits are ``(samples, length, vocab)``, the tokens ``(samples, length)``; position i
predicts token i + 1, so the last position of every block is not scored, and a padded
position (``attention_mask`` 0) neither predicts nor is predicted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _scored(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Which positions predict a real next token: (samples, length - 1) booleans."""
    if mask is None:
        return torch.ones(tokens.shape[0], tokens.shape[1] - 1, dtype=torch.bool)
    m = mask.bool()
    return m[:, :-1] & m[:, 1:]


def perplexity(
    logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None
) -> float:
    """exp of the mean next-token negative log-likelihood over the scored positions."""
    keep = _scored(tokens, mask)
    nll = F.cross_entropy(
        logits[:, :-1][keep].float(), tokens[:, 1:][keep].to(logits.device), reduction="mean"
    )
    return float(math.exp(min(float(nll), 700.0)))


def top1_agreement(dense: torch.Tensor, sparse: torch.Tensor, keep: torch.Tensor) -> float:
    """Fraction of scored positions where both models predict the same next token."""
    d = dense[:, :-1][keep].argmax(-1)
    s = sparse[:, :-1][keep].argmax(-1)
    return float((d == s).float().mean())


def kl_to_dense(dense: torch.Tensor, sparse: torch.Tensor, keep: torch.Tensor) -> float:
    """Mean KL(dense || sparse) of the next-token distributions, in nats per token."""
    p = F.log_softmax(dense[:, :-1][keep].float(), dim=-1)
    q = F.log_softmax(sparse[:, :-1][keep].float(), dim=-1)
    return float(F.kl_div(q, p, log_target=True, reduction="batchmean"))


def tokens_of(
    batches: Sequence[Mapping[str, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The evaluation tokens and attention mask of ``batches``, concatenated."""
    tokens = torch.cat([b["input_ids"] for b in batches])
    masks = [b.get("attention_mask") for b in batches]
    mask = torch.cat(masks) if all(m is not None for m in masks) else None
    return tokens, mask


def lm_quality(dense: torch.Tensor, sparse: torch.Tensor, batches) -> dict[str, Any]:
    """The evaluation's quality block for a causal LM: perplexity first (lower is better),
    agreement and KL as secondary figures."""
    tokens, mask = tokens_of(batches)
    keep = _scored(tokens, mask)
    d, s = perplexity(dense, tokens, mask), perplexity(sparse, tokens, mask)
    return {
        "metric": "perplexity",
        "metric_description": "held-out next-token perplexity on the evaluation token blocks",
        "higher_is_better": False,
        "dense": d,
        "sparse": s,
        "drop": s - d,
        "secondary": {
            "top1_agreement": {"dense": 1.0, "sparse": top1_agreement(dense, sparse, keep)},
            "kl_to_dense": {"dense": 0.0, "sparse": kl_to_dense(dense, sparse, keep)},
        },
    }
