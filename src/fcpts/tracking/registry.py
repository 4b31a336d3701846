"""The model registry: register gated sparse models, choose the champion, promote, roll back.

MLflow 3 aliases and version tags; no stages.

* :func:`register` registers the logged model of a pipeline's MLflow run, only when the
  gate approved it. Each version carries the tags ``target``, ``achieved_sparsity``,
  ``metric``, ``metric_value`` (the sparse model's), ``dense_metric_value``,
  ``greater_is_better``, ``allocator``, ``model_source``, ``model_digest``,
  ``prunable``, ``source_run_id``, ``evaluation_digest``, ``fcpts_version``, then
  ``decision`` and ``decision_reason``. Registering a run that already has a version
  (same ``source_run_id`` tag) returns that version: no second one.
* The new version gets the alias ``challenger``. It takes the alias ``champion`` (and
  drops ``challenger``) when there is no champion, or when :func:`decide` says it beats
  the champion. One registered model holds every target of a source model (the default
  name is ``<model>-<method>``), so the rule says what happens when targets differ: only
  versions measured alike compete (same metric, evaluation data, source model and
  prunable weights, where known); a sparser version wins (the gate already held it
  to the tolerance against the dense model); at the same sparsity the better metric wins
  (a tie does not); a less sparse version never displaces the champion. The champion is
  thus the sparsest approved version, best by the metric among equals, in whatever order
  they were registered. The reason is written to the version's ``decision_reason`` tag
  and description.
* :func:`promote` makes any version the champion by hand; :func:`rollback` gives the
  alias back to the previous champion. The champions so far are kept, oldest first, in the
  registered model's tag ``fcpts.champion_history`` (a JSON list of versions).

Concurrency: an alias is a single pointer, so MLflow itself never shows two champions; the
race is in the *decision*. Two pipelines that finish at once would each compare with the
same old champion and both move the alias, the worse one possibly last. So every
decision (register, promote, rollback) runs under a lock held in the registry itself: the
registered model ``<name>.fcpts-lock``. Creating a registered model is atomic on every
MLflow backend (a unique key in the database, RESOURCE_ALREADY_EXISTS for the loser), so
whoever creates it holds the lock, across processes and machines that share the tracking
server, with no extra service; releasing deletes it. The holder writes a random token in
the lock's tags and checks it before each write (a holder whose lock was broken stops
instead of writing). A lock older than ``lock_ttl`` (120 s; a decision takes well under a
second) is taken to be left by a crashed process and broken. Under the lock the state is
re-read and repaired before it is changed: a champion alias that the history does not
end with (moved by hand in the UI, or a crash between the two writes) is added to the
history first, and duplicate versions of one run (a retried request) are deleted but the
first. Since every decision compares with the champion that the previous decision left,
the champion after N concurrent registrations is the best of them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

from mlflow.entities import RunTag

from ..errors import UserError
from .connection import Store
from .decision import ChampionChange, Registration, decide, greater_is_better, utc_stamp
from .lock import RegistryLock
from .names import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    M_CHAMPION_HISTORY,
    NA,
    TAG_DECISION,
    TAG_GATE,
    TAG_GATE_REASONS,
    TAG_MODEL_VERSION,
    TAG_REGISTERED_MODEL,
    V_DECISION,
    V_REASON,
)
from .retry import RetryPolicy
from .versions import (
    champion_history,
    check_name,
    ensure_model,
    model_aliases,
    model_version,
    record_decision,
    registered_model,
    run_facts,
    set_champion,
    version_summary,
    versions_of_run,
)

__all__ = [
    "ChampionChange",
    "Registration",
    "RegistryLock",
    "champion",
    "decide",
    "greater_is_better",
    "load_model",
    "promote",
    "register",
    "register_request",
    "registry_hook",
    "rollback",
]


# -------------------------------------------------------------------------------- public


def register(
    run_id: str,
    name: str,
    *,
    tracking_uri: str | None = None,
    approved: bool = True,
    reasons: Iterable[str] = (),
    greater_is_better: bool | None = None,
    lock_timeout: float = 60.0,
    lock_ttl: float = 120.0,
    retry: RetryPolicy | None = None,
) -> Registration:
    """Register the logged model of MLflow run ``run_id`` as a version of model ``name``.

    ``approved``/``reasons``: the gate's verdict. A rejected run is not registered (its
    run is tagged ``fcpts.gate=rejected`` with the reasons). An approved one gets a version
    (or its existing version: idempotent by the ``source_run_id`` tag), the alias
    ``challenger``, and ``champion`` when :func:`decide` says so. ``greater_is_better``
    defaults to the run's ``fcpts.higher_is_better`` tag, else to the metric's name. Raises UserError for a run that lacks what registering
    needs, ServiceError when the store cannot be reached or the lock not taken.
    """
    name = check_name(name)
    reasons = [str(r) for r in reasons]
    store = Store(tracking_uri, retry=retry)
    if not approved:
        why = "; ".join(reasons) or "no reason given"
        store.call(
            "tag the run",
            store.client.log_batch,
            run_id,
            tags=[RunTag(TAG_GATE, "rejected"), RunTag(TAG_GATE_REASONS, why[:5000])],
        )
        return Registration(
            name, None, False, False, "rejected", f"the gate rejected it: {why}", None
        )

    facts, model_uri = run_facts(store, run_id, greater_is_better)
    # a logged model's URI is models:/<model id>; the server wants the id alongside
    model_id = model_uri[len("models:/") :] if model_uri.startswith("models:/m-") else None
    with RegistryLock(store, name, timeout=lock_timeout, ttl=lock_ttl) as lock:
        ensure_model(store, name)
        existing = versions_of_run(store, name, run_id)
        created = not existing
        if created:
            lock.verify()
            # an embedded store resolves models:/m-... through MLflow's global tracking URI
            with store.fluent():
                store.call(
                    "create the model version",
                    store.client.create_model_version,
                    name,
                    model_uri,
                    run_id=run_id,
                    tags=facts,
                    description=version_summary(facts),
                    model_id=model_id,
                )
            existing = versions_of_run(store, name, run_id)
            for extra in existing[1:]:  # repair: a retried request made two
                store.call(
                    "delete a duplicate version",
                    store.client.delete_model_version,
                    name,
                    str(extra.version),
                )
        mv = existing[0]
        version = str(mv.version)
        decision, reason = (mv.tags or {}).get(V_DECISION), (mv.tags or {}).get(V_REASON, "")
        if not decision:  # new, or left undecided by a process that died
            rm = registered_model(store, name)
            current = model_aliases(rm).get(ALIAS_CHAMPION)
            champion_mv = model_version(store, name, current, must_exist=False) if current else None
            promote_it, reason = decide(facts, champion_mv.tags if champion_mv else None, current)
            lock.verify()
            store.call(
                "set the challenger alias",
                store.client.set_registered_model_alias,
                name,
                ALIAS_CHALLENGER,
                version,
            )
            if promote_it:
                set_champion(store, lock, name, version, reason)
                decision = "champion"
            else:
                record_decision(store, name, mv, "challenger", reason)
                decision = "challenger"
        is_champion = model_aliases(registered_model(store, name)).get(ALIAS_CHAMPION) == version
    run_tags = {
        TAG_GATE: "approved",
        TAG_GATE_REASONS: "; ".join(reasons)[:5000] or NA,
        TAG_REGISTERED_MODEL: name,
        TAG_MODEL_VERSION: version,
        TAG_DECISION: decision,
    }
    store.call(
        "tag the run",
        store.client.log_batch,
        run_id,
        tags=[RunTag(k, v) for k, v in run_tags.items()],
    )
    return Registration(
        name, version, created, is_champion, decision, reason, f"models:/{name}/{version}"
    )


def promote(
    name: str,
    version: str | int,
    *,
    tracking_uri: str | None = None,
    reason: str | None = None,
    lock_timeout: float = 60.0,
    retry: RetryPolicy | None = None,
) -> ChampionChange:
    """Make ``version`` the champion of ``name`` by hand, whatever the rule says; the
    previous champion stays in the history for :func:`rollback`."""
    name = check_name(name)
    version = str(version)
    store = Store(tracking_uri, retry=retry)
    with RegistryLock(store, name, timeout=lock_timeout) as lock:
        rm = registered_model(store, name)  # an unknown model says so, not "no version"
        model_version(store, name, version)
        current = model_aliases(rm).get(ALIAS_CHAMPION)
        if current == version:
            return ChampionChange(
                name, version, current, f"version {version} is the champion already"
            )
        why = reason or f"promoted by hand (fcpts promote) on {utc_stamp()}"
        previous = set_champion(store, lock, name, version, why)
    return ChampionChange(name, version, previous, why)


def rollback(
    name: str,
    *,
    tracking_uri: str | None = None,
    lock_timeout: float = 60.0,
    retry: RetryPolicy | None = None,
) -> ChampionChange:
    """Give the champion alias back to the previous champion (the last one in
    ``fcpts.champion_history`` before the current one that still exists). Raises
    UserError when there is no champion or no previous one."""
    name = check_name(name)
    store = Store(tracking_uri, retry=retry)
    with RegistryLock(store, name, timeout=lock_timeout) as lock:
        rm = registered_model(store, name)
        current = model_aliases(rm).get(ALIAS_CHAMPION)
        if current is None:
            raise UserError(f"model {name!r} has no champion: nothing to roll back")
        history = champion_history(rm)
        while history and history[-1] == current:
            history.pop()
        previous = None
        while history:
            candidate = history[-1]
            if (
                candidate != current
                and model_version(store, name, candidate, must_exist=False) is not None
            ):
                previous = candidate
                break
            history.pop()
        if previous is None:
            raise UserError(
                f"model {name!r} has no previous champion to roll back to (champion: version {current})"
            )
        why = f"rolled back from version {current} to version {previous} (fcpts rollback) on {utc_stamp()}"
        lock.verify()
        store.call(
            "set the champion alias",
            store.client.set_registered_model_alias,
            name,
            ALIAS_CHAMPION,
            previous,
        )
        store.call(
            "record the champion history",
            store.client.set_registered_model_tag,
            name,
            M_CHAMPION_HISTORY,
            json.dumps(history),
        )
        record_decision(store, name, model_version(store, name, previous), "champion", why)
        old = model_version(store, name, current, must_exist=False)
        if old is not None:
            record_decision(store, name, old, "rolled back", why)
    return ChampionChange(name, previous, current, why)


def registry_hook(
    run_id: str, *, tracking_uri: str | None = None, **options: Any
) -> Callable[[Any], dict[str, Any]]:
    """A registry for ``fcpts.steps.register(..., registry=...)``: called with the step's
    ``RegistryRequest`` (``name``, ``decision.approved``, ``decision.reasons``), it
    registers the logged model of MLflow run ``run_id`` (see :func:`register`; ``options``
    go there) and returns what happened as a JSON-able dict for ``decision.json``."""
    store_uri = Store(tracking_uri).safe_uri

    def hook(request: Any) -> dict[str, Any]:
        done = register(
            run_id,
            request.name,
            tracking_uri=tracking_uri,
            approved=bool(request.decision.approved),
            reasons=list(request.decision.reasons),
            **options,
        )
        return {"registry": "mlflow", "tracking_uri": store_uri, "run_id": run_id, **asdict(done)}

    return hook


def register_request(request: Any) -> dict[str, Any]:
    """:func:`registry_hook` configured by the environment, for
    ``FCPTS_REGISTRY=fcpts.tracking.registry:register_request``: the run is
    ``$MLFLOW_RUN_ID``, the store ``$MLFLOW_TRACKING_URI`` (else the embedded default)."""
    run_id = os.environ.get("MLFLOW_RUN_ID", "").strip()
    if not run_id:
        raise UserError(
            "the MLflow registry needs the pipeline's MLflow run: set MLFLOW_RUN_ID "
            "(PipelineRun.run_id) or pass registry=registry_hook(run_id)"
        )
    return registry_hook(run_id)(request)


def champion(name: str, *, tracking_uri: str | None = None, retry: RetryPolicy | None = None):
    """The champion's ModelVersion (tags say its metric, sparsity and why), or None."""
    name = check_name(name)
    store = Store(tracking_uri, retry=retry)
    rm = registered_model(store, name, must_exist=False)
    current = model_aliases(rm).get(ALIAS_CHAMPION) if rm is not None else None
    return model_version(store, name, current, must_exist=False) if current else None


def load_model(
    name: str,
    alias: str = ALIAS_CHAMPION,
    *,
    tracking_uri: str | None = None,
    retry: RetryPolicy | None = None,
):
    """``mlflow.pytorch.load_model("models:/<name>@<alias>")`` from this store."""
    import mlflow.pytorch

    name = check_name(name)
    store = Store(tracking_uri, retry=retry)
    with store.fluent():
        return store.call(
            f"load models:/{name}@{alias}",
            mlflow.pytorch.load_model,
            f"models:/{name}@{alias}",
        )
