"""Tasks: how to run a model on a batch, what output to compare, and how.

A task keeps model-specific glue out of the algorithm. It splits a batch into call
arguments, extracts the output that the reconstruction loss compares with the dense model
(``target``), the output that evaluation uses (``output``), and the loss between a
student's and the teacher's targets.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


def to_device(batch: Any, device: torch.device | str) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """||s - t||^2 / ||t||^2: scale-free, 0 when equal, 1 when the student outputs zeros."""
    return (student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12)


class Task:
    """Generic task: the batch is a tensor (or ``{"x": tensor}``); outputs compared by MSE."""

    kind = "regression"
    metric = "output_mse"

    def split(self, batch: Any) -> tuple[tuple, dict]:
        if isinstance(batch, Mapping):
            return (batch["x"],), {}
        return (batch,), {}

    def output(self, raw: Any, batch: Any) -> torch.Tensor:
        if isinstance(raw, (tuple, list)):
            raw = raw[0]
        return raw

    def target(self, raw: Any, batch: Any) -> torch.Tensor:
        return self.output(raw, batch)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        return relative_mse(student, teacher)

    def run(
        self, model: nn.Module, batch: Any, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> Any:
        args, kwargs = self.split(batch)
        if overrides:
            return functional_call(model, dict(overrides), args, kwargs, strict=False)
        return model(*args, **kwargs)

    def batch_size(self, batch: Any) -> int:
        args, kwargs = self.split(batch)
        first = args[0] if args else next(iter(kwargs.values()))
        return int(first.shape[0])


class ClassifierTask(Task):
    """Logits out; reconstruction by KL divergence at a temperature, evaluation by top-1."""

    kind = "classifier"
    metric = "top1"

    def __init__(self, temperature: float = 2.0) -> None:
        self.temperature = temperature

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        return kl_at_temperature(student, teacher, self.temperature)


class EncoderTask(Task):
    """A Hugging Face encoder with mean pooling (sentence-transformers style).

    Evaluation compares L2-normalised mean-pooled sentence embeddings. The reconstruction
    target is the final hidden state of every real token (``recon="tokens"``, the default)
    or the pooled embedding (``recon="embedding"``).
    """

    kind = "encoder"
    metric = "cosine"

    def __init__(self, recon: str = "tokens") -> None:
        if recon not in ("tokens", "embedding"):
            raise ValueError(f"recon must be 'tokens' or 'embedding', got {recon!r}")
        self.recon = recon

    def split(self, batch: Any) -> tuple[tuple, dict]:
        return (), dict(batch)

    @staticmethod
    def _hidden(raw: Any) -> torch.Tensor:
        if hasattr(raw, "last_hidden_state"):
            return raw.last_hidden_state
        return raw[0] if isinstance(raw, (tuple, list)) else raw

    def output(self, raw: Any, batch: Any) -> torch.Tensor:
        hidden = self._hidden(raw)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return F.normalize(pooled, dim=-1)

    def target(self, raw: Any, batch: Any) -> torch.Tensor:
        if self.recon == "embedding":
            return self.output(raw, batch)
        hidden = self._hidden(raw)
        return hidden[batch["attention_mask"].bool()]

    def batch_size(self, batch: Any) -> int:
        return int(batch["input_ids"].shape[0])


def kl_at_temperature(student: torch.Tensor, teacher: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) of softmax distributions at temperature ``t``, averaged over
    the rows (every axis but the last), scaled by t^2 (Hinton's distillation loss)."""
    s = student.reshape(-1, student.shape[-1])
    q = teacher.reshape(-1, teacher.shape[-1])
    return F.kl_div(
        F.log_softmax(s / t, dim=-1),
        F.log_softmax(q / t, dim=-1),
        log_target=True,
        reduction="batchmean",
    ) * (t * t)


def is_causal_lm(model: nn.Module) -> bool:
    """A Hugging Face ``AutoModelForCausalLM`` model (GPT-2, Llama, Qwen2, Mistral, Phi...)."""
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name == "GPT2LMHeadModel"


class CausalLMTask(Task):
    """A Hugging Face decoder on fixed-length token blocks (``input_ids``,
    ``attention_mask``).

    The output is the next-token logits ``(batch, length, vocab)``; evaluation turns them
    into held-out perplexity, top-1 agreement and KL against the dense model
    (:mod:`fcpts.lm_metrics`). The reconstruction target is the logits of every real
    token, compared by KL(teacher || student) at ``temperature``; block outputs add to it
    where the method's ``blocks`` setting names them.
    """

    kind = "causal-lm"
    metric = "perplexity"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def split(self, batch: Any) -> tuple[tuple, dict]:
        return (), {k: v for k, v in dict(batch).items() if k in ("input_ids", "attention_mask")}

    def output(self, raw: Any, batch: Any) -> torch.Tensor:
        return raw.logits if hasattr(raw, "logits") else raw[0]

    def target(self, raw: Any, batch: Any) -> torch.Tensor:
        logits = self.output(raw, batch)
        mask = batch.get("attention_mask")
        return logits[mask.bool()] if mask is not None else logits.reshape(-1, logits.shape[-1])

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, batch: Any) -> torch.Tensor:
        return kl_at_temperature(student, teacher, self.temperature)

    def batch_size(self, batch: Any) -> int:
        return int(batch["input_ids"].shape[0])
