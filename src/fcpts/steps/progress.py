"""The steps' progress, one helper for all of them (:class:`Progress`): a bar on a
terminal, plain ``[fcpts] <step>: ...`` lines on stdout elsewhere (a pipeline step's log,
which ``fcpts run`` relays, a file, a CI job), at a bounded rate."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from ..errors import UserError

T = TypeVar("T")


PROGRESS_MODES = ("auto", "bar", "lines", "off")


def progress_mode(mode: str | None) -> str:
    """``bar``, ``lines`` or ``off``: ``auto`` (or None) is a bar when stderr is a terminal
    and plain lines otherwise (a pipeline step's log, a file, a CI job)."""
    mode = mode or "auto"
    if mode not in PROGRESS_MODES:
        raise UserError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if mode == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    return mode


class Progress:
    """How far one loop of a step is: a tqdm bar on stderr (``bar``), or plain lines on
    stdout (``lines``) such as ``[fcpts] calibrate: 256/512 samples, 12 s``, or nothing.

    Lines come at a bounded rate: when another ``fraction`` of ``total`` is done (and
    ``min_seconds`` have passed since the last line), at least every ``max_seconds``, every
    ``every`` items when given, and once at :meth:`close` (the count and the time taken;
    nothing when nothing was counted).
    ``clock`` is the time source (:func:`time.monotonic`)."""

    def __init__(
        self,
        step: str,
        total: int | None = None,
        unit: str = "batches",
        mode: str | None = "auto",
        *,
        what: str = "",
        fraction: float = 0.1,
        min_seconds: float = 2.0,
        max_seconds: float = 30.0,
        every: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.mode = progress_mode(mode)
        self.label = f"{step}: {what} " if what else f"{step}: "
        self.step, self.total, self.unit = step, total, unit
        self.fraction, self.min_seconds, self.max_seconds = fraction, min_seconds, max_seconds
        self.every, self.clock = every, clock
        self.done = self.shown = 0  # counted, and counted at the last line
        self.extra = ""
        self.start = self.last = clock()
        self.reached = 0  # fractions done
        self.what = what
        self.bar: Any = None  # a tqdm bar, made at the first update in the bar mode

    def update(self, n: int = 1, **extra: float) -> None:
        self.done += n
        if extra:
            self.extra = ", " + ", ".join(f"{k} {v:.4f}" for k, v in extra.items())
        if self.mode == "bar":
            if self.bar is None:
                from tqdm.auto import tqdm

                desc = f"{self.step} {self.what}".strip()
                self.bar = tqdm(total=self.total, desc=desc, unit=self.unit, leave=False)
            self.bar.update(n)
            return
        if self.mode != "lines":
            return
        now = self.clock()
        reached = int(self.done / self.total / self.fraction + 1e-9) if self.total else 0
        crossed = reached > self.reached  # another fraction done
        self.reached = max(reached, self.reached)
        due = (crossed and now - self.last >= self.min_seconds) or (
            now - self.last >= self.max_seconds
        )
        if self.every > 0 and (self.done % self.every == 0 or self.done == n):
            due = True
        if due and not (self.total and self.done >= self.total):  # the last line: close()
            self._line(now)

    def note(self, text: str) -> None:
        """One line about the step (``[fcpts] register: ...``), unless the mode is off."""
        if self.mode != "off":
            print(f"[fcpts] {self.step}: {text}", flush=True)

    def callback(
        self, inner: Callable[[int, dict[str, float]], None] | None
    ) -> Callable[[int, dict[str, float]], None]:
        """An allocator's callback: ``inner`` with each iteration counted here (a bar is
        then the allocator's own)."""

        def callback(iteration: int, record: dict[str, float]) -> None:
            if self.mode == "lines":
                names = (
                    ("loss", "loss"),
                    ("rec_loss", "reconstruction"),
                    ("global_sparsity", "sparsity"),
                )
                self.update(**{shown: record[key] for key, shown in names if key in record})
            if inner is not None:
                inner(iteration, record)

        return callback

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines":
            if self.done and self.done != self.shown:
                self._line(self.clock())
            self.mode = "off"

    def _line(self, now: float) -> None:
        of = f"/{self.total}" if self.total else ""
        print(
            f"[fcpts] {self.label}{self.done}{of} {self.unit}, {now - self.start:.1f} s{self.extra}",
            flush=True,
        )
        self.last, self.shown = now, self.done

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(
    iterable: Iterable[T],
    step: str,
    mode: str | None = "auto",
    total: int | None = None,
    *,
    what: str = "",
    unit: str = "batches",
    size: Callable[[T], int] | None = None,
) -> Iterator[T]:
    """``iterable`` with its :class:`Progress` shown; each item counts ``size(item)``
    (e.g. the samples of a batch) units, else one."""
    with Progress(step, total, unit, mode, what=what) as shown:
        for item in iterable:
            yield item
            shown.update(size(item) if size is not None else 1)


def batch_progress(
    batches: Sequence[Any],
    task: Any,
    step: str,
    mode: str | None,
    what: str = "",
    items: Iterable[Any] | None = None,
) -> Iterator[Any]:
    """:func:`progress` over a step's ``batches`` (or ``items``, one per batch, e.g. the
    batches moved to the device), counted in samples of the ``task``."""
    total = sum(task.batch_size(b) for b in batches)
    return progress(
        batches if items is None else items,
        step,
        mode,
        total,
        what=what,
        unit="samples",
        size=task.batch_size,
    )
