"""The model registry: register gated sparse models, choose the champion, promote, roll back.

MLflow 3 aliases and version tags; no stages.

* :func:`register` registers the logged model of a pipeline's MLflow run, only when the
  gate approved it. Each version carries the tags ``target``, ``achieved_sparsity``,
  ``metric``, ``metric_value`` (the sparse model's), ``dense_metric_value``,
  ``greater_is_better``, ``allocator``, ``source_run_id``, ``evaluation_digest``,
  ``fcpts_version``, then ``decision`` and ``decision_reason``. Registering a run that
  already has a version (same ``source_run_id`` tag) returns that version: no second one.
* The new version gets the alias ``challenger``. It takes the alias ``champion`` (and
  drops ``challenger``) when there is no champion, or when it beats the champion on the
  same metric, measured on the same evaluation data where both digests are known, at the
  same or a higher achieved sparsity (:func:`decide`). A lower sparsity never displaces
  the champion; a tie does not either. The reason is written to the version's
  ``decision_reason`` tag and description.
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
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException

from ..errors import ServiceError, UserError
from .connection import RetryPolicy, Store
from .names import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    LOCK_SUFFIX,
    M_CHAMPION_HISTORY,
    METRIC_ACHIEVED,
    METRIC_DENSE,
    METRIC_SPARSE,
    NA,
    TAG_DECISION,
    TAG_DIGEST,
    TAG_GATE,
    TAG_GATE_REASONS,
    TAG_HIGHER_IS_BETTER,
    TAG_MODEL_URI,
    TAG_MODEL_VERSION,
    TAG_REGISTERED_MODEL,
    TAG_VERSION,
    V_ACHIEVED,
    V_ALLOCATOR,
    V_DECISION,
    V_DENSE,
    V_EVAL_DIGEST,
    V_FCPTS_VERSION,
    V_GREATER_IS_BETTER,
    V_METRIC,
    V_REASON,
    V_SOURCE_RUN,
    V_TARGET,
    V_VALUE,
)

HISTORY_MAX = 100
LOWER_IS_BETTER = frozenset(
    {"output_mse", "mse", "rmse", "mae", "loss", "perplexity", "ppl", "error", "kl"}
)
_EXISTS = "RESOURCE_ALREADY_EXISTS"
_MISSING = "RESOURCE_DOES_NOT_EXIST"


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


def _utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def _fmt(value: Any) -> str:
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
        return True, f"first champion: {metric} {_fmt(value)} at sparsity {_fmt(achieved)}"
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
            f"{metric} {_fmt(v_new)} does not beat {who}'s {_fmt(v_old)} "
            f"({'higher' if higher else 'lower'} is better)"
        )
    return (
        True,
        f"{metric} {_fmt(v_new)} beats {who}'s {_fmt(v_old)} at sparsity {a_new:.4f} >= {a_old:.4f}",
    )


# --------------------------------------------------------------------------------- lock


class RegistryLock:
    """A lock for one registered model, held as the registered model ``<name>.fcpts-lock``
    on the same tracking server (see the module docstring)."""

    def __init__(self, store: Store, name: str, *, timeout: float = 60.0, ttl: float = 120.0):
        self.store = store
        self.name = name
        self.lock_name = name + LOCK_SUFFIX
        self.timeout = timeout
        self.ttl = ttl
        self.token = uuid.uuid4().hex
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.held = False

    def __enter__(self) -> RegistryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _read(self):
        try:
            return self.store.call(
                "read the registry lock",
                self.store.client.get_registered_model,
                self.lock_name,
                passthrough=(_MISSING,),
            )
        except MlflowException:
            return None

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        delay = 0.05
        while True:
            try:
                self.store.call(
                    f"take the registry lock of {self.name}",
                    self.store.client.create_registered_model,
                    self.lock_name,
                    tags={"fcpts.lock": "true", "holder": self.holder, "token": self.token},
                    description=(
                        f"Lock of fcpts decisions on model {self.name}; held by {self.holder}. "
                        f"Safe to delete when older than {self.ttl:.0f} s."
                    ),
                    passthrough=(_EXISTS,),
                )
                self.held = True
                return
            except MlflowException:
                pass  # somebody holds it
            held = self._read()
            if held is not None:
                age = time.time() - held.creation_timestamp / 1000.0
                if age > self.ttl:
                    self._break(held.tags.get("token"))
                    continue
            if time.monotonic() > deadline:
                holder = held.tags.get("holder", "?") if held is not None else "?"
                raise ServiceError(
                    f"could not take the registry lock of model {self.name} within "
                    f"{self.timeout:.0f} s: another fcpts process ({holder}) holds it on "
                    f"{self.store.safe_uri}; retry later, or if no fcpts process is running, "
                    f"delete the registered model {self.lock_name!r} (MLflow UI, or "
                    f"MlflowClient().delete_registered_model({self.lock_name!r}))"
                )
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 0.5)

    def _break(self, token: str | None) -> None:
        again = self._read()
        if again is None or again.tags.get("token") != token:
            return  # released or re-taken meanwhile
        try:
            self.store.call(
                "break a stale registry lock",
                self.store.client.delete_registered_model,
                self.lock_name,
                passthrough=(_MISSING,),
            )
        except MlflowException:
            pass

    def verify(self) -> None:
        """Raise ServiceError unless this process still holds the lock."""
        held = self._read()
        if held is None or held.tags.get("token") != self.token:
            self.held = False
            raise ServiceError(
                f"lost the registry lock of model {self.name} (held longer than {self.ttl:.0f} s "
                "and broken by another process); nothing more was changed: rerun the command"
            )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        held = self._read()
        if held is None or held.tags.get("token") != self.token:
            return
        try:
            self.store.call(
                f"release the registry lock of {self.name}",
                self.store.client.delete_registered_model,
                self.lock_name,
                passthrough=(_MISSING,),
            )
        except MlflowException:
            pass


# ------------------------------------------------------------------------------ helpers


def _check_name(name: str) -> str:
    name = str(name).strip()
    if not name or any(c in name for c in "/:'\"%") or name.endswith(LOCK_SUFFIX):
        raise UserError(
            f"model name {name!r} is not valid: use letters, digits, '.', '_', '-' or spaces "
            f"(no / : ' \" %, not ending in {LOCK_SUFFIX})"
        )
    return name


def _registered_model(store: Store, name: str, *, must_exist: bool = True):
    try:
        return store.call(
            f"read registered model {name}",
            store.client.get_registered_model,
            name,
            passthrough=(_MISSING,),
        )
    except MlflowException:
        if must_exist:
            raise UserError(f"there is no registered model {name!r} on {store.safe_uri}") from None
        return None


def _version(store: Store, name: str, version: str, *, must_exist: bool = True):
    try:
        return store.call(
            f"read version {version} of {name}",
            store.client.get_model_version,
            name,
            str(version),
            passthrough=(_MISSING, "INVALID_PARAMETER_VALUE"),
        )
    except MlflowException:
        if must_exist:
            raise UserError(
                f"model {name!r} has no version {version!r} on {store.safe_uri}"
            ) from None
        return None


def _aliases(rm) -> dict[str, str]:
    aliases = getattr(rm, "aliases", None) or {}
    if isinstance(aliases, Mapping):
        return {str(k): str(v) for k, v in aliases.items()}
    return {str(a.alias): str(a.version) for a in aliases}


def _history(rm) -> list[str]:
    raw = (rm.tags or {}).get(M_CHAMPION_HISTORY)
    try:
        value = json.loads(raw) if raw else []
    except json.JSONDecodeError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []


def _versions_of_run(store: Store, name: str, run_id: str) -> list:
    found = store.call(
        "search the versions of the run",
        store.client.search_model_versions,
        f"name = '{name}' and tags.{V_SOURCE_RUN} = '{run_id}'",
    )
    return sorted(found, key=lambda mv: int(mv.version))


def _summary(tags: Mapping[str, str]) -> str:
    return (
        f"fcpts {tags.get(V_ALLOCATOR, NA)} at sparsity {_fmt(tags.get(V_ACHIEVED))} "
        f"(target {tags.get(V_TARGET, NA)}): {tags.get(V_METRIC, NA)} {_fmt(tags.get(V_VALUE))} "
        f"(dense {_fmt(tags.get(V_DENSE, NA))}); source run {tags.get(V_SOURCE_RUN, NA)}."
    )


def _record(store: Store, name: str, mv, decision: str, reason: str) -> None:
    """Write a decision to a version's tags and description."""
    version = str(mv.version)
    for key, value in ((V_DECISION, decision), (V_REASON, reason)):
        store.call("tag the version", store.client.set_model_version_tag, name, version, key, value)
    store.call(
        "describe the version",
        store.client.update_model_version,
        name,
        version,
        description=f"{_summary(mv.tags or {})}\n\n{decision} ({_utc()}): {reason}",
    )


def _set_champion(
    store: Store, lock: RegistryLock, name: str, version: str, reason: str
) -> str | None:
    """Move the champion alias to version (history repaired and extended); returns the
    previous champion."""
    rm = _registered_model(store, name)
    current = _aliases(rm).get(ALIAS_CHAMPION)
    history = _history(rm)
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
    if _aliases(rm).get(ALIAS_CHALLENGER) == version:
        store.call(
            "drop the challenger alias",
            store.client.delete_registered_model_alias,
            name,
            ALIAS_CHALLENGER,
        )
    _record(store, name, _version(store, name, version), "champion", reason)
    if current:
        old = _version(store, name, current, must_exist=False)
        if old is not None:
            _record(store, name, old, "former champion", f"replaced by version {version}: {reason}")
    return current


def _run_facts(store: Store, run_id: str, higher: bool | None) -> tuple[dict[str, str], str]:
    """(version tags, model URI) from the pipeline's MLflow run."""
    try:
        run = store.call("read the run", store.client.get_run, run_id, passthrough=(_MISSING,))
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
        V_SOURCE_RUN: run_id,
        V_FCPTS_VERSION: tags.get(TAG_VERSION, NA),
    }
    digest = tags.get(TAG_DIGEST.format(context="evaluation"))
    if digest:
        facts[V_EVAL_DIGEST] = digest
    return facts, tags[TAG_MODEL_URI]


def _ensure_model(store: Store, name: str) -> None:
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
            passthrough=(_EXISTS,),
        )
    except MlflowException:
        pass


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
    name = _check_name(name)
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

    facts, model_uri = _run_facts(store, run_id, greater_is_better)
    # a logged model's URI is models:/<model id>; the server wants the id alongside
    model_id = model_uri[len("models:/") :] if model_uri.startswith("models:/m-") else None
    with RegistryLock(store, name, timeout=lock_timeout, ttl=lock_ttl) as lock:
        _ensure_model(store, name)
        existing = _versions_of_run(store, name, run_id)
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
                    description=_summary(facts),
                    model_id=model_id,
                )
            existing = _versions_of_run(store, name, run_id)
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
            rm = _registered_model(store, name)
            current = _aliases(rm).get(ALIAS_CHAMPION)
            champion_mv = _version(store, name, current, must_exist=False) if current else None
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
                _set_champion(store, lock, name, version, reason)
                decision = "champion"
            else:
                _record(store, name, mv, "challenger", reason)
                decision = "challenger"
        is_champion = _aliases(_registered_model(store, name)).get(ALIAS_CHAMPION) == version
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
    name = _check_name(name)
    version = str(version)
    store = Store(tracking_uri, retry=retry)
    with RegistryLock(store, name, timeout=lock_timeout) as lock:
        rm = _registered_model(store, name)  # an unknown model says so, not "no version"
        _version(store, name, version)
        current = _aliases(rm).get(ALIAS_CHAMPION)
        if current == version:
            return ChampionChange(
                name, version, current, f"version {version} is the champion already"
            )
        why = reason or f"promoted by hand (fcpts promote) on {_utc()}"
        previous = _set_champion(store, lock, name, version, why)
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
    name = _check_name(name)
    store = Store(tracking_uri, retry=retry)
    with RegistryLock(store, name, timeout=lock_timeout) as lock:
        rm = _registered_model(store, name)
        current = _aliases(rm).get(ALIAS_CHAMPION)
        if current is None:
            raise UserError(f"model {name!r} has no champion: nothing to roll back")
        history = _history(rm)
        while history and history[-1] == current:
            history.pop()
        previous = None
        while history:
            candidate = history[-1]
            if (
                candidate != current
                and _version(store, name, candidate, must_exist=False) is not None
            ):
                previous = candidate
                break
            history.pop()
        if previous is None:
            raise UserError(
                f"model {name!r} has no previous champion to roll back to (champion: version {current})"
            )
        why = (
            f"rolled back from version {current} to version {previous} (fcpts rollback) on {_utc()}"
        )
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
        _record(store, name, _version(store, name, previous), "champion", why)
        old = _version(store, name, current, must_exist=False)
        if old is not None:
            _record(store, name, old, "rolled back", why)
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
    name = _check_name(name)
    store = Store(tracking_uri, retry=retry)
    rm = _registered_model(store, name, must_exist=False)
    current = _aliases(rm).get(ALIAS_CHAMPION) if rm is not None else None
    return _version(store, name, current, must_exist=False) if current else None


def load_model(
    name: str,
    alias: str = ALIAS_CHAMPION,
    *,
    tracking_uri: str | None = None,
    retry: RetryPolicy | None = None,
):
    """``mlflow.pytorch.load_model("models:/<name>@<alias>")`` from this store."""
    import mlflow.pytorch

    name = _check_name(name)
    store = Store(tracking_uri, retry=retry)
    with store.fluent():
        return store.call(
            f"load models:/{name}@{alias}",
            mlflow.pytorch.load_model,
            f"models:/{name}@{alias}",
        )
