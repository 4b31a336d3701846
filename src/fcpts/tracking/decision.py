"""What a registration did, and the rule that picks the champion (:func:`decide`)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .names import (
    NA,
    V_ACHIEVED,
    V_EVAL_DIGEST,
    V_GREATER_IS_BETTER,
    V_METRIC,
    V_MODEL_DIGEST,
    V_PRUNABLE,
    V_VALUE,
)

# achieved sparsities this close are one target: round(t x N) / N for the same N
SAME_SPARSITY = 1e-9
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
    """(promote?, reason) for a candidate's version tags against the champion's.

    The champion rule. Every version here passed the gate: its quality is within the
    tolerance of the same dense model's. A candidate is compared with the champion only
    when both are measured alike: the same metric, the same evaluation data, the same
    source model and the same prunable weights (digests and counts, where both are known);
    otherwise it stays challenger with a reason saying why, and ``fcpts promote`` decides.
    Then:

    * sparser (a higher achieved sparsity, e.g. target 0.7 against a 0.5 champion): it
      wins. Metrics at different sparsities do not compare like with like (the sparser one
      is nearly always a little worse); the gate's tolerance is the quality bar and,
      within it, more sparsity is what fcpts is for;
    * the same sparsity (the same target of the same model): it wins when its metric is
      strictly better (higher, or lower for a lower-is-better metric); a tie does not;
    * less sparse: it never displaces the champion.

    So the champion is the sparsest approved version and, among those, the best by the
    metric: the same whatever order the versions were registered in.
    """
    metric = candidate.get(V_METRIC, NA)
    value = candidate.get(V_VALUE)
    achieved = candidate.get(V_ACHIEVED)
    if champion is None:
        return (
            True,
            f"first champion: {metric} {fmt_number(value)} at sparsity {fmt_number(achieved)}",
        )
    who = f"champion version {champion_version}" if champion_version else "the champion"
    unlike = _unlike(candidate, champion, who)
    if unlike:
        return False, f"{unlike}; promote it by hand (fcpts promote) if it should serve"
    try:
        a_new, a_old = float(achieved), float(champion[V_ACHIEVED])
        v_new, v_old = float(value), float(champion[V_VALUE])
    except (KeyError, TypeError, ValueError):
        return (
            False,
            f"{who} has no usable {V_ACHIEVED}/{V_VALUE} tags; promote by hand (fcpts promote)",
        )
    if a_new < a_old - SAME_SPARSITY:
        return False, (
            f"sparsity {a_new:.4f} is below {who}'s {a_old:.4f}: a lower sparsity never "
            "displaces the champion"
        )
    if a_new > a_old + SAME_SPARSITY:
        return True, (
            f"sparsity {a_new:.4f} beats {who}'s {a_old:.4f} within the gate's tolerance "
            f"({metric} {fmt_number(v_new)} vs {fmt_number(v_old)}): across targets the "
            "sparser approved version wins"
        )
    higher = candidate.get(V_GREATER_IS_BETTER, "true") != "false"
    better = v_new > v_old if higher else v_new < v_old
    if not better:
        return False, (
            f"{metric} {fmt_number(v_new)} does not beat {who}'s {fmt_number(v_old)} "
            f"at the same sparsity {a_new:.4f} ({'higher' if higher else 'lower'} is better)"
        )
    return (
        True,
        f"{metric} {fmt_number(v_new)} beats {who}'s {fmt_number(v_old)} at the same sparsity {a_new:.4f}",
    )


def _unlike(candidate: Mapping[str, str], champion: Mapping[str, str], who: str) -> str | None:
    """Why the two are not measured alike, or None."""
    metric = candidate.get(V_METRIC, NA)
    if champion.get(V_METRIC) != metric:
        return (
            f"not comparable with {who}: it is measured by {champion.get(V_METRIC)}, "
            f"this version by {metric}"
        )
    for key, what in (
        (V_EVAL_DIGEST, "evaluated on other data"),
        (V_MODEL_DIGEST, "made from another source model"),
        (V_PRUNABLE, "another set of prunable weights (layer selection)"),
    ):
        new, old = candidate.get(key), champion.get(key)
        if new and old and new != NA and old != NA and new != old:
            return f"not comparable with {who}: {what} ({key} {new} vs {old})"
    return None
