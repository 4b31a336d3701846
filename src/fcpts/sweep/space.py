"""What a sweep searches (:class:`SearchSpace`) and what a study optimises
(:class:`SweepSpec`, stored in the study so every worker runs the same thing)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..settings import Declared, declared
from ..sources import Sources

SCORES = ("magnitude", "wanda")


def searched_settings() -> dict[str, Declared]:
    """The fcpts settings whose declaration carries a search range (:mod:`fcpts.settings`):
    what a sweep searches, besides the score."""
    from ..alloc.fcpts import FCPTS

    return {s.name: s for s in declared(FCPTS.Config) if s.opt.search is not None}


def swept() -> tuple[str, ...]:
    """The names of the searched fcpts settings, in declaration order."""
    return tuple(searched_settings())


def default_bounds() -> dict[str, tuple[Any, ...]]:
    """Each searched setting's declared range, and the scores."""
    bounds: dict[str, tuple[Any, ...]] = {
        name: (s.opt.search.low, s.opt.search.high) for name, s in searched_settings().items()
    }
    bounds["score"] = SCORES
    return bounds


def _pair(value: Any, name: str, cast: Callable[[Any], Any]) -> tuple[Any, Any]:
    if isinstance(value, str):
        lo, sep, hi = value.partition(":")
        value = (lo, hi if sep else lo)
    if isinstance(value, (int, float)):
        value = (value, value)
    try:
        lo, hi = (cast(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(f"search range of {name} must be LO:HI numbers, got {value!r}") from None
    return lo, hi


@dataclass(frozen=True)
class SearchSpace:
    """The ranges searched: each fcpts setting declared with a search range (floats on a
    log scale, integers uniformly), plus ``score``, the scores tried. A range with
    ``lo == hi`` fixes that setting."""

    bounds: Mapping[str, Any] = field(default_factory=default_bounds)

    def __post_init__(self) -> None:
        declared_ranges = searched_settings()
        checked: dict[str, tuple[Any, ...]] = {}
        for name, value in {**default_bounds(), **dict(self.bounds)}.items():
            if name == "score":
                checked[name] = _scores(value)
                continue
            if name not in declared_ranges:
                raise UserError(
                    f"cannot search {name!r}: the sweep searches {', '.join([*declared_ranges, 'score'])}"
                )
            if declared_ranges[name].type is int:
                lo, hi = _pair(value, name, _as_int)
                if not 1 <= lo <= hi:
                    raise UserError(f"search range of {name} must be 1 <= LO <= HI, got {lo}:{hi}")
            else:
                lo, hi = _pair(value, name, float)
                if not (0 < lo <= hi) or not math.isfinite(hi):
                    raise UserError(
                        f"search range of {name} must be 0 < LO <= HI (log scale), got {lo}:{hi}"
                    )
            checked[name] = (lo, hi)
        object.__setattr__(self, "bounds", checked)

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any] | Sequence[str] | None) -> SearchSpace:
        """A space from ``{"lam": "0.5:2", "score": "wanda"}`` or ``["lam=0.5:2", ...]``;
        names left out keep their declared range."""
        if not overrides:
            return cls()
        if not isinstance(overrides, Mapping):
            items = {}
            for item in overrides:
                key, eq, value = str(item).partition("=")
                if not eq or not key.strip():
                    raise UserError(
                        f"--space takes NAME=LO:HI (e.g. lam=0.1:10, score=wanda), got {item!r}"
                    )
                items[key.strip().replace("-", "_")] = value.strip()
            overrides = items
        return cls(dict(overrides))

    def range(self, name: str) -> tuple[Any, ...]:
        return self.bounds[name]

    def to_dict(self) -> dict[str, Any]:
        return {name: list(value) for name, value in self.bounds.items()}

    def suggest(self, trial: Any) -> tuple[dict[str, Any], str]:
        """The fcpts settings and the score that ``trial`` tries."""
        settings: dict[str, Any] = {}
        for name, setting in searched_settings().items():
            lo, hi = self.bounds[name]
            if setting.type is int:
                settings[name] = trial.suggest_int(name, lo, hi)
            else:
                settings[name] = trial.suggest_float(name, lo, hi, log=setting.opt.search.log)
        score = trial.suggest_categorical("score", list(self.bounds["score"]))
        return settings, score

    def baseline(self) -> tuple[dict[str, Any], list[str]]:
        """The declared defaults as trial params, each clipped into the searched range, and
        the names that had to be clipped."""
        params: dict[str, Any] = {}
        clipped = []
        for name, setting in searched_settings().items():
            lo, hi = self.bounds[name]
            inside = min(hi, max(lo, setting.default))
            if inside != setting.default:
                clipped.append(name)
            params[name] = inside
        scores = self.bounds["score"]
        score = "wanda" if "wanda" in scores else scores[0]
        if score != "wanda":
            clipped.append("score")
        params["score"] = score
        return params, clipped


def _scores(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    scores = tuple(dict.fromkeys(str(s).strip() for s in items if str(s).strip()))
    bad = [s for s in scores if s not in SCORES]
    if bad or not scores:
        raise UserError(
            f"scores to search must be among {', '.join(SCORES)}, got {','.join(scores) or 'none'}"
        )
    return scores


def _as_int(value: Any) -> int:
    f = float(value)
    if f != int(f):
        raise ValueError(value)
    return int(f)


# ------------------------------------------------------------------------ study config


@dataclass(frozen=True)
class SweepSpec:
    """What a study optimises: stored in the study, so every worker runs the same thing."""

    sources: Sources
    target: float
    seed: int = 0
    calibration_samples: int | None = None
    batch_size: int | None = None
    validation_samples: int | None = None
    eval_batch_size: int | None = None
    selection: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=lambda: SearchSpace().to_dict())
    report_every: int = 20

    def __post_init__(self) -> None:
        from ..landing import check_target

        object.__setattr__(self, "target", float(check_target(self.target)))
        if isinstance(self.sources, Mapping):
            object.__setattr__(self, "sources", Sources.from_dict(self.sources))
        clash = sorted(set(self.settings) & set(swept()))
        if clash:
            raise UserError(
                f"setting {clash[0]!r} is searched by the sweep: fix it with --space "
                f"{clash[0]}=X:X instead of --set"
            )
        if "seed" in self.settings:
            raise UserError("give the seed with --seed, not as an allocator setting")
        if int(self.report_every) < 1:
            raise UserError(f"--report-every must be >= 1, got {self.report_every}")
        for name in ("calibration_samples", "batch_size", "validation_samples", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value <= 0):
                raise UserError(
                    f"--{name.replace('_', '-')} must be a positive integer, got {value}"
                )
        SearchSpace.from_overrides(self.space)  # validates

    @property
    def search_space(self) -> SearchSpace:
        return SearchSpace.from_overrides(self.space)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SweepSpec:
        """A spec from :meth:`to_dict` (or from a study made before the sources were
        nested: their fields at the top level)."""
        data = dict(data)
        if "sources" not in data:
            data["sources"] = {k: data[k] for k in Sources.__dataclass_fields__ if k in data}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def default_study_name(model: str, target: float) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", str(model)).strip("-")[:60] or "model"
    return f"fcpts-{slug}-t{float(target):g}"
