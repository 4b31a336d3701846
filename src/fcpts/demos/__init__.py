"""Built-in demos that run offline: ``demo:minilm`` and ``demo:digits-cnn``."""

from __future__ import annotations

from .base import Demo, load_demo, DEMOS

__all__ = ["DEMOS", "Demo", "load_demo"]
