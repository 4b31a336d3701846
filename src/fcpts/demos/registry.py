"""The built-in demos by name: each demo module is imported here, never the other way."""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType

from ..errors import UserError
from . import digits, effnet_lite, gpt2, minilm
from .base import Demo

DEMOS: MappingProxyType[str, Callable[[], Demo]] = MappingProxyType(
    {
        "minilm": minilm.load,
        "digits-cnn": digits.load,
        "effnet-lite0": effnet_lite.load,
        "gpt2-tiny": gpt2.load,
    }
)


def load_demo(name: str) -> Demo:
    key = name.removeprefix("demo:")
    if key not in DEMOS:
        raise UserError(
            f"unknown demo {name!r}: choose one of {', '.join('demo:' + k for k in DEMOS)}"
        )
    return DEMOS[key]()
