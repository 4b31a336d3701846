"""A Hugging Face decoder taken apart: the shell (embeddings, norm, head) and its blocks.

The shell is the model built with one block, holding the real non-block weights read from
the shards; its forward pass is stopped at the first block, which records what the model
passes every block (hidden states, rotary embeddings, masks, positions). A block is built
alone from its class and the config, and its weights are read from the shards, so one
block is resident at a time.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .shards import ShardReader

BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


class _Stop(Exception):
    """Raised by the catcher once the first block's inputs are recorded."""

    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__("stopped at the first block")
        self.args, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name in ("attention_type", "layer_idx"):  # attributes models read from a block
            if hasattr(block, name):
                setattr(self, name, getattr(block, name))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise _Stop(args, kwargs)


def _load_config(folder: str | os.PathLike):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


class Decoder:
    """The shards of a decoder folder, read one block at a time."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = folder
        self.reader = ShardReader(folder)
        self.config = _load_config(folder)
        self.config.use_cache = False
        names = self.reader.names()
        prefix = next((p for p in BLOCK_LISTS if any(n.startswith(f"{p}.0.") for n in names)), None)
        if prefix is None:
            raise UserError(
                f"{folder} is not a decoder the block-wise path knows: no tensors under "
                f"{', '.join(p + '.0' for p in BLOCK_LISTS)}"
            )
        self.prefix = prefix
        self.blocks = int(self.config.num_hidden_layers)
        self._block_class: type | None = None

    def block_prefix(self, b: int) -> str:
        return f"{self.prefix}.{b}."

    def shell(self) -> nn.Module:
        """The model with one block (replaced by the catcher) and its real non-block weights."""
        from transformers import AutoModelForCausalLM

        cfg = copy.deepcopy(self.config)
        cfg.num_hidden_layers = 1
        if getattr(cfg, "layer_types", None):
            cfg.layer_types = list(cfg.layer_types[:1])
        model = AutoModelForCausalLM.from_config(cfg).eval()
        # blocks built alone attend the way the model does (sdpa, eager, ...)
        self.config._attn_implementation = model.config._attn_implementation
        blocks = model.get_submodule(self.prefix)
        self._block_class = type(blocks[0])
        rest = self.reader.read(
            [n for n in self.reader.names() if not n.startswith(self.prefix + ".")]
        )
        missing, unexpected = model.load_state_dict(rest, strict=False)
        if unexpected:
            raise UserError(f"{self.folder}: weights {unexpected[:3]} do not fit its config")
        blocks[0] = _Catcher(blocks[0])
        model.config.num_hidden_layers = self.blocks
        return model

    @torch.no_grad()
    def block_inputs(
        self, shell: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple, dict]:
        """What the model passes its first block on ``batch``: (hidden, args, kwargs)."""
        shell.config.num_hidden_layers = 1
        try:
            shell(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"))
        except _Stop as stop:
            args = stop.args
            kwargs = {
                k: v
                for k, v in stop.kwargs.items()
                if k not in ("past_key_values", "past_key_value", "layer_past")
            }
            hidden = args[0] if args else kwargs.pop("hidden_states")
            return hidden, tuple(args[1:]), kwargs
        finally:
            shell.config.num_hidden_layers = self.blocks
        raise RuntimeError("the model's forward never reached its first block")

    def block(self, b: int) -> nn.Module:
        """Block ``b`` built alone with its weights from the shards (float32, eval mode)."""
        if self._block_class is None:
            self.shell()
        module = self._block_class(self.config, layer_idx=b)
        module.load_state_dict(self.reader.prefixed(self.block_prefix(b)), strict=True)
        return module.float().eval()


def run_block(
    block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, overrides=None
) -> torch.Tensor:
    """The block's output hidden states (with ``overrides``: parameters replaced)."""
    if overrides:
        out = torch.func.functional_call(
            block, dict(overrides), (hidden, *args), kwargs, strict=False
        )
    else:
        out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
