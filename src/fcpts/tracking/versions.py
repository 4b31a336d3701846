"""Reading and writing a registered model's versions, aliases and champion history."""

from __future__ import annotations

import json
from collections.abc import Mapping

from mlflow.exceptions import MlflowException

from ..errors import UserError
from .connection import Store
from .decision import fmt_number, greater_is_better, utc_stamp
from .lock import RegistryLock
from .names import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    ERR_EXISTS,
    ERR_MISSING,
    LOCK_SUFFIX,
    M_CHAMPION_HISTORY,
    METRIC_ACHIEVED,
    METRIC_DENSE,
    METRIC_SPARSE,
    NA,
    TAG_DIGEST,
    TAG_HIGHER_IS_BETTER,
    TAG_MODEL_URI,
    TAG_VERSION,
    V_ACHIEVED,
    V_ALLOCATOR,
    V_DECISION,
    V_DENSE,
    V_EVAL_DIGEST,
    V_FCPTS_VERSION,
    V_GREATER_IS_BETTER,
    V_METRIC,
    V_MODEL_DIGEST,
    V_MODEL_SOURCE,
    V_PRUNABLE,
    V_REASON,
    V_SOURCE_RUN,
    V_TARGET,
    V_VALUE,
    model_base,
)

HISTORY_MAX = 100


def check_name(name: str) -> str:
    name = str(name).strip()
    if not name or any(c in name for c in "/:'\"%") or name.endswith(LOCK_SUFFIX):
        raise UserError(
            f"model name {name!r} is not valid: use letters, digits, '.', '_', '-' or spaces "
            f"(no / : ' \" %, not ending in {LOCK_SUFFIX})"
        )
    return name


def registered_model(store: Store, name: str, *, must_exist: bool = True):
    try:
        return store.call(
            f"read registered model {name}",
            store.client.get_registered_model,
            name,
            passthrough=(ERR_MISSING,),
        )
    except MlflowException:
        if must_exist:
            raise UserError(f"there is no registered model {name!r} on {store.safe_uri}") from None
        return None


def model_version(store: Store, name: str, version: str, *, must_exist: bool = True):
    try:
        return store.call(
            f"read version {version} of {name}",
            store.client.get_model_version,
            name,
            str(version),
            passthrough=(ERR_MISSING, "INVALID_PARAMETER_VALUE"),
        )
    except MlflowException:
        if must_exist:
            raise UserError(
                f"model {name!r} has no version {version!r} on {store.safe_uri}"
            ) from None
        return None


def model_aliases(rm) -> dict[str, str]:
    aliases = getattr(rm, "aliases", None) or {}
    if isinstance(aliases, Mapping):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(a.alias): str(a.version) for a in aliases}


def champion_history(rm) -> list[str]:
    raw = (rm.tags or {}).get(M_CHAMPION_HISTORY)
    try:
        value = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def versions_of_run(store: Store, name: str, run_id: str) -> list:
    found = store.call(
        "search the versions of the run",
        store.client.search_model_versions,
        f"name = '{name}' and tags.{V_SOURCE_RUN} = '{run_id}'",
    )
    return sorted(found, key=lambda mv: int(mv.version))


def version_summary(tags: Mapping[str, str]) -> str:
    """A version's description, e.g. "minilm pruned by fcpts to 50% sparsity (0.500000 of
    its prunable weights are zero), cosine 0.93 (dense 1); source run <id>."."""
    model = model_base(tags[V_MODEL_SOURCE]) if tags.get(V_MODEL_SOURCE, NA) != NA else "the model"
    target = tags.get(V_TARGET, NA)
    try:
        to = f"to {float(target) * 100:g}% sparsity"
    except (TypeError, ValueError):
        to = "(no target recorded)"
    try:
        achieved = f"{float(tags.get(V_ACHIEVED)):.6f}"
    except (TypeError, ValueError):
        achieved = NA
    return (
        f"{model} pruned by {tags.get(V_ALLOCATOR, NA)} {to} ({achieved} of its prunable "
        f"weights are zero), {tags.get(V_METRIC, NA)} {fmt_number(tags.get(V_VALUE))} "
        f"(dense {fmt_number(tags.get(V_DENSE, NA))}); source run {tags.get(V_SOURCE_RUN, NA)}."
    )


def record_decision(store: Store, name: str, mv, decision: str, reason: str) -> None:
    """Write a decision to a version's tags and description."""
    version = str(mv.version)
    for key, value in ((V_DECISION, decision), (V_REASON, reason)):
        store.call("tag the version", store.client.set_model_version_tag, name, version, key, value)
    store.call(
        "describe the version",
        store.client.update_model_version,
        name,
        version,
        description=f"{version_summary(mv.tags or {})}\n\n{decision} ({utc_stamp()}): {reason}",
    )


def set_champion(
    store: Store, lock: RegistryLock, name: str, version: str, reason: str
) -> str | None:
    """Move the champion alias to version (history repaired and extended); returns the
    previous champion."""
    rm = registered_model(store, name)
    current = model_aliases(rm).get(ALIAS_CHAMPION)
    history = champion_history(rm)
    if current and (not history or history[-1] != current):
        history.append(current)  # repair: moved by hand, or a crash between two writes
    if current == version:
        return current
    history = (history + [version])[-HISTORY_MAX:]
    lock.verify()
    store.call(
        "set the champion alias",
        store.client.set_registered_model_alias,
        name,
        ALIAS_CHAMPION,
        version,
    )
    store.call(
        "record the champion history",
        store.client.set_registered_model_tag,
        name,
        M_CHAMPION_HISTORY,
        json.dumps(history),
    )
    if model_aliases(rm).get(ALIAS_CHALLENGER) == version:
        store.call(
            "drop the challenger alias",
            store.client.delete_registered_model_alias,
            name,
            ALIAS_CHALLENGER,
        )
    record_decision(store, name, model_version(store, name, version), "champion", reason)
    if current:
        old = model_version(store, name, current, must_exist=False)
        if old is not None:
            record_decision(
                store, name, old, "former champion", f"replaced by version {version}: {reason}"
            )
    return current


def run_facts(store: Store, run_id: str, higher: bool | None) -> tuple[dict[str, str], str]:
    """(version tags, model URI) from the pipeline's MLflow run."""
    try:
        run = store.call("read the run", store.client.get_run, run_id, passthrough=(ERR_MISSING,))
    except MlflowException:
        raise UserError(f"there is no MLflow run {run_id!r} on {store.safe_uri}") from None
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    needs = {
        "the logged model (PipelineRun.log_model)": tags.get(TAG_MODEL_URI),
        f"the metric {METRIC_SPARSE} (PipelineRun.log_evaluation)": metrics.get(METRIC_SPARSE),
        "the param metric (PipelineRun.log_evaluation)": params.get("metric"),
        f"the metric {METRIC_ACHIEVED} (PipelineRun.log_allocation)": metrics.get(METRIC_ACHIEVED),
    }
    missing = [what for what, value in needs.items() if value is None]
    if missing:
        raise UserError(f"run {run_id} cannot be registered: it has no {', '.join(missing)}")
    metric = params["metric"]
    if higher is None and tags.get(TAG_HIGHER_IS_BETTER) in ("true", "false"):
        higher = tags[TAG_HIGHER_IS_BETTER] == "true"
    if higher is None:
        higher = greater_is_better(metric)
    facts = {
        V_TARGET: params.get("target", NA),
        V_ACHIEVED: repr(float(metrics[METRIC_ACHIEVED])),
        V_METRIC: metric,
        V_VALUE: repr(float(metrics[METRIC_SPARSE])),
        V_DENSE: repr(float(metrics[METRIC_DENSE])) if METRIC_DENSE in metrics else NA,
        V_GREATER_IS_BETTER: "true" if higher else "false",
        V_ALLOCATOR: params.get("allocator", NA),
        V_MODEL_SOURCE: params.get("model_source", NA),
        V_MODEL_DIGEST: params.get("model_digest", NA),
        V_PRUNABLE: params.get("prunable", NA),
        V_SOURCE_RUN: run_id,
        V_FCPTS_VERSION: tags.get(TAG_VERSION, NA),
    }
    digest = tags.get(TAG_DIGEST.format(context="evaluation"))
    if digest:
        facts[V_EVAL_DIGEST] = digest
    return facts, tags[TAG_MODEL_URI]


def ensure_model(store: Store, name: str) -> None:
    try:
        store.call(
            f"create registered model {name}",
            store.client.create_registered_model,
            name,
            tags={"fcpts": "true"},
            description=(
                "Sparse models made by fcpts. Alias champion: the version to serve; "
                "challenger: the latest candidate that did not beat it. The versions' "
                "decision_reason tags say why; fcpts.champion_history lists the champions."
            ),
            passthrough=(ERR_EXISTS,),
        )
    except MlflowException:
        pass
