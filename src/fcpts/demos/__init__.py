"""Built-in demos that run offline: ``demo:minilm`` and ``demo:digits-cnn``."""

from __future__ import annotations

from .base import Demo
from .registry import DEMOS, load_demo

__all__ = ["DEMOS", "Demo", "load_demo"]
