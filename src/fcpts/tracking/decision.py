"""What a registration did, and the rule that picks the champion (:func:`decide`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .names import NA, V_ACHIEVED, V_EVAL_DIGEST, V_GREATER_IS_BETTER, V_METRIC, V_VALUE

LOWER_IS_BETTER = frozenset(
    {"output_mse", "mse", "rmse", "mae", "loss", "perplexity", "ppl", "error", "kl"}
)


@dataclass(frozen=True)
class Registration:
    """What :func:`register` did. ``version`` is None when the gate rejected the run."""

    name: str
    version: str | None
    created: bool  # False: the run had a version already, or the gate rejected it
    champion: bool  # this version is the champion now
    decision: str  # champion, challenger, rejected (or a later decision of an old version)
    reason: str
    model_uri: str | None  # models:/<name>/<version>


@dataclass(frozen=True)
class ChampionChange:
    """What :func:`promote` or :func:`rollback` did."""

    name: str
    version: str  # the champion now
    previous: str | None  # the champion before
    reason: str


def greater_is_better(metric: str) -> bool:
    """Whether a higher ``metric`` is better (top1, cosine, ...; not mse, loss, ...)."""
    return str(metric).lower() not in LOWER_IS_BETTER


def utc_stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def fmt_number(value: Any) -> str:
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return str(value)


def decide(
    candidate: Mapping[str, str],
    champion: Mapping[str, str] | None,
    champion_version: str | None = None,
) -> tuple[bool, str]:
    """(promote?, reason) for a candidate's version tags against the champion's."""
    metric = candidate.get(V_METRIC, NA)
    value = candidate.get(V_VALUE)
    achieved = candidate.get(V_ACHIEVED)
    if champion is None:
        return (
            True,
            f"first champion: {metric} {fmt_number(value)} at sparsity {fmt_number(achieved)}",
        )
    who = f"champion version {champion_version}" if champion_version else "the champion"
    if champion.get(V_METRIC) != metric:
        return False, (
            f"not comparable with {who}: it is measured by {champion.get(V_METRIC)}, this version "
            f"by {metric}; promote it by hand (fcpts promote) if it should serve"
        )
    d_new, d_old = candidate.get(V_EVAL_DIGEST), champion.get(V_EVAL_DIGEST)
    if d_new and d_old and d_new != d_old:
        return False, (
            f"not comparable with {who}: evaluated on other data (digest {d_new} vs {d_old}); "
            "promote it by hand (fcpts promote) if it should serve"
        )
    try:
        a_new, a_old = float(achieved), float(champion[V_ACHIEVED])
        v_new, v_old = float(value), float(champion[V_VALUE])
    except (KeyError, TypeError, ValueError):
        return (
            False,
            f"{who} has no usable {V_ACHIEVED}/{V_VALUE} tags; promote by hand (fcpts promote)",
        )
    if a_new < a_old - 1e-12:
        return False, (
            f"sparsity {a_new:.4f} is below {who}'s {a_old:.4f}: a lower sparsity never "
            "displaces the champion"
        )
    higher = candidate.get(V_GREATER_IS_BETTER, "true") != "false"
    better = v_new > v_old if higher else v_new < v_old
    if not better:
        return False, (
            f"{metric} {fmt_number(v_new)} does not beat {who}'s {fmt_number(v_old)} "
            f"({'higher' if higher else 'lower'} is better)"
        )
    return (
        True,
        f"{metric} {fmt_number(v_new)} beats {who}'s {fmt_number(v_old)} at sparsity {a_new:.4f} >= {a_old:.4f}",
    )
