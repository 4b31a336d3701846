"""What every data source is once resolved (:class:`DataSource`), and which samples a
split takes of it: a third of a seeded permutation of ``--data``, or the whole of a
split's own source in a seeded order (:class:`Picker`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import UserError
from .spec import SPLITS


@dataclass
class DataSource:
    """A data set serving the three splits; ``split`` returns batches ready for the task.

    ``label_range`` is the smallest and largest class label over the whole data set (every
    split), when the source knows it before any split is taken. ``flag`` names the option
    it came from and ``whole`` says whether a split takes all of it (a split's own source)
    or its third (``--data``; a demo has its own fixed splits). A source resolved for all splits (:func:`resolve_data`)
    describes its primary split's source and keeps every split's in ``parts``."""

    source: str
    kind: str  # demo | text | images | tensors
    samples: int | None  # total size (None for the demos: their splits are fixed)
    has_labels: bool
    digest: str | None = None
    classes: list[str] | None = None
    label_range: tuple[int, int] | None = None
    flag: str = "--data"
    whole: bool = False
    sample_shape: tuple[int, ...] | None = None
    parts: dict[str, DataSource | None] | None = None
    _loader: Any = None

    def split(
        self, name: str, n: int, batch_size: int, seed: int = 0, exact: bool = False
    ) -> list[Any]:
        """Up to ``n`` samples of split ``name`` in batches; ``exact``: a UserError when
        the split holds fewer than ``n`` (the count was asked for, not a default)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}")
        if n <= 0 or batch_size <= 0:
            raise UserError(
                f"sample counts and batch sizes must be positive, got {n} and {batch_size}"
            )
        if self.parts is not None:
            return self.part(name).split(name, n, batch_size, seed, exact)
        return self._loader(name, n, batch_size, seed, exact)

    def part(self, name: str) -> DataSource:
        """The source serving split ``name``; a UserError when there is none."""
        if self.parts is None:
            return self
        part = self.parts.get(name)
        if part is None:
            raise UserError(
                f"no data for the {name} split: pass --{name}-data (or --data, split in thirds)"
            )
        return part

    def describe(self) -> dict[str, Any]:
        out = {
            "source": self.source,
            "kind": self.kind,
            "samples": self.samples,
            "has_labels": self.has_labels,
            "sha256": self.digest,
            "classes": self.classes,
            "flag": self.flag,
            "split_by": "demo" if self.kind == "demo" else "whole" if self.whole else "thirds",
        }
        if self.parts is not None:
            out["splits"] = {
                name: None if part is None else {k: v for k, v in part.describe().items()}
                for name, part in self.parts.items()
            }
        return out


def split_indices(total: int, name: str, seed: int) -> list[int]:
    """The indices of split ``name`` of a data set of ``total`` samples (thirds of a
    seeded permutation: disjoint whatever the sample counts asked for)."""
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed))).tolist()
    third = total // 3
    bounds = {
        "calibration": (0, third),
        "validation": (third, 2 * third),
        "evaluation": (2 * third, total),
    }
    lo, hi = bounds[name]
    return perm[lo:hi]


@dataclass(frozen=True)
class Picker:
    """Which samples of a source of ``total`` a split takes: a third, or all of them."""

    total: int
    spec: str
    flag: str
    whole: bool

    def __call__(self, name: str, n: int, seed: int, exact: bool) -> list[int]:
        if self.whole:
            gen = torch.Generator().manual_seed(int(seed))
            pool = torch.randperm(self.total, generator=gen).tolist()
        else:
            pool = split_indices(self.total, name, seed)
        if not pool:
            raise UserError(
                f"{self.flag} {self.spec} has {self.total} sample{'s' if self.total != 1 else ''}: "
                f"too few for a {name} split (each split gets a third)"
            )
        if exact and n > len(pool):
            held = "holds" if self.whole else f"gives the {name} split a third of its {self.total}:"
            raise UserError(
                f"{self.flag} {self.spec} {held} {len(pool)} samples, fewer than the {n} asked "
                f"with --{name}-samples: ask for at most {len(pool)}"
                + ("" if self.whole else f" or give the split its own --{name}-data")
            )
        return pool[: min(n, len(pool))]


def check_agree(parts: Mapping[str, DataSource | None]) -> None:
    seen: dict[int, tuple[str, DataSource]] = {}
    for name, part in parts.items():
        if part is not None and id(part) not in seen:
            seen[id(part)] = (name, part)
    given = list(seen.values())
    for i, (name_a, a) in enumerate(given):
        for name_b, b in given[i + 1 :]:
            if a.kind == "demo" or b.kind == "demo":
                continue
            where = f"{a.flag} {a.source} (for {name_a}) and {b.flag} {b.source} (for {name_b})"
            if a.digest is not None and a.digest == b.digest:
                raise UserError(
                    f"{where} hold the same data: the evaluation must be held out; give each "
                    "split different samples, or --data alone (split in thirds)"
                )
            if a.kind != b.kind:
                raise UserError(f"{where} are different kinds of data ({a.kind}, {b.kind})")
            if a.sample_shape and b.sample_shape and a.sample_shape != b.sample_shape:
                raise UserError(
                    f"{where} hold samples of different shapes {list(a.sample_shape)} and "
                    f"{list(b.sample_shape)}: every split must fit the same model input"
                )
