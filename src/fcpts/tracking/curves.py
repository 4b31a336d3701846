"""The allocator's curves sent to MLflow while it runs, in batches."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric

from ..errors import ServiceError
from .names import CURVE_PREFIX
from .params import metric_key, now_ms

if TYPE_CHECKING:
    from .tracking import PipelineRun

log = logging.getLogger(__name__)

# a record's own step counter: the metric's step says it already
STEP_KEYS = frozenset({"iteration", "step"})


class CurveLogger:
    """The allocator's ``callback(step, record)``: buffers each record as step-indexed
    metrics ``<prefix>/<key>`` (not the record's ``iteration``: that is the step) and sends them with ``log_batch`` every ``every`` steps or
    ``seconds`` seconds, whichever comes first, so the UI draws the curves while the
    allocator runs without one request per iteration.

    A failed send inside the callback keeps the points for the next send (the allocation
    is not stopped by a tracking hiccup); :meth:`close` sends the rest and raises
    ServiceError if the store is still unreachable.
    """

    def __init__(
        self,
        run: PipelineRun,
        prefix: str = CURVE_PREFIX,
        *,
        every: int = 100,
        seconds: float = 10.0,
    ):
        self.run = run
        self.prefix = prefix.rstrip("/")
        self.every = max(1, int(every))
        self.seconds = float(seconds)
        self.points: list[Metric] = []
        self.steps = 0
        self.pending_steps = 0
        self._last_send = time.monotonic()
        self._warned = False

    def __call__(self, step: int, record: Mapping[str, Any]) -> None:
        ts = now_ms()
        for key, value in record.items():
            if key in STEP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            self.points.append(
                Metric(metric_key(f"{self.prefix}/{key}"), float(value), ts, int(step))
            )
        self.steps += 1
        self.pending_steps += 1
        if self.pending_steps >= self.every or time.monotonic() - self._last_send >= self.seconds:
            try:
                self.flush()
            except ServiceError as exc:
                if not self._warned:
                    log.warning("allocator curves not sent yet (will retry): %s", exc)
                    self._warned = True

    def flush(self) -> None:
        self._last_send = time.monotonic()
        if not self.points:
            return
        points = self.points
        self.run.log_batch("log the allocator curves", metrics=points)
        self.points = []
        self.pending_steps = 0

    close = flush

    def __enter__(self) -> CurveLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
