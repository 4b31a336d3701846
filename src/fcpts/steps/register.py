"""Step 4, register: the approval gate, its recorded decision, and a pluggable registry.

:func:`gate` is pure: metrics + manifest + tolerance in, a :class:`Decision` out. It
approves a sparse model when (a) the quality drop versus dense is within the tolerance
(in the metric's own units: top-1 points, cosine, relative MSE), (b) the sparsity counted
from the weights is exactly the target (``round(target x N)`` zeros of ``N`` prunable
weights) and (c) the metrics describe this very sparse model (same sha256).

:func:`register` applies the gate, writes ``decision.json`` with the reasons, and hands
the decision to a registry: any callable ``registry(request) -> dict | None`` (``request``
is a :class:`RegistryRequest`), or a ``"module:function"`` string naming one (default:
``$FCPTS_REGISTRY``). The registry is called for both outcomes so it can record a
rejection too; it must register the model only when ``request.decision.approved``
(``fcpts.tracking.registry:register_request`` does: approved -> a new version, rejected
-> the run is tagged rejected). Whatever it returns lands in ``decision.json``. With no
registry the decision is recorded only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..errors import FcptsError, ServiceError, UserError
from ..sparse_model import read_manifest, round_half_up
from ..tracking.names import TAG_COMMAND, TAG_STEP, default_model_name
from .common import (
    input_file_or_folder,
    input_folder,
    is_remote,
    read_json,
    write_json,
    write_output,
)
from .progress import Progress
from .reproduce import reproduce_command
from .tracked import Tracking, failure_recorded, finish_step

FORMAT = "fcpts.decision/1"
DECISION_FILE = "decision.json"
REGISTRY_ENV = "FCPTS_REGISTRY"
MLFLOW_REGISTRY = "mlflow (fcpts.tracking.registry)"


@dataclass
class Decision:
    approved: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self, tolerance: float | None = None) -> dict[str, Any]:
        return {"approved": self.approved, "reasons": list(self.reasons), "tolerance": tolerance}


def _number(data: Mapping[str, Any], key: str, where: str) -> float:
    if key not in data:
        raise UserError(f"{where} has no {key!r}: rerun `fcpts evaluate` to write complete metrics")
    try:
        return float(data[key])
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key!r} must be a number, got {data[key]!r}") from None


def check_tolerance(tolerance: Any) -> float:
    try:
        value = float(tolerance)
    except (TypeError, ValueError):
        raise UserError(f"--tolerance must be a number >= 0, got {tolerance!r}") from None
    if not math.isfinite(value) or value < 0:
        raise UserError(
            f"--tolerance must be a finite number >= 0 (allowed quality drop), got {tolerance}"
        )
    return value


def gate(metrics: Mapping[str, Any], manifest: Mapping[str, Any], tolerance: float) -> Decision:
    """Approve or reject, with one reason per check (passed or failed)."""
    tolerance = check_tolerance(tolerance)
    if not isinstance(metrics, Mapping) or "metric" not in metrics:
        raise UserError(
            "the metrics have no 'metric': give the metrics.json written by `fcpts evaluate`"
        )
    name = str(metrics["metric"])
    dense = _number(metrics, "dense", "the metrics")
    sparse = _number(metrics, "sparse", "the metrics")
    target = _number(manifest, "target", "the manifest")
    higher = bool(metrics.get("higher_is_better", True))
    reasons: list[str] = []
    approved = True

    drop = dense - sparse if higher else sparse - dense
    if not (math.isfinite(dense) and math.isfinite(sparse)):
        approved = False
        reasons.append(f"quality: {name} is not finite (dense {dense}, sparse {sparse}): rejected")
    elif drop <= tolerance + 1e-12:
        reasons.append(
            f"quality: {name} {sparse:.4f} vs dense {dense:.4f}, drop {drop:.4f} <= tolerance {tolerance:g}"
        )
    else:
        approved = False
        reasons.append(
            f"quality: {name} {sparse:.4f} vs dense {dense:.4f}, drop {drop:.4f} > tolerance {tolerance:g}"
        )

    if "zeros" in metrics and "prunable" in metrics:
        zeros, prunable = int(metrics["zeros"]), int(metrics["prunable"])
        expected = round_half_up(target * prunable)
        achieved = zeros / prunable if prunable else float("nan")
        if zeros == expected:
            reasons.append(
                f"sparsity: {zeros:,} of {prunable:,} weights are zero ({achieved:.6f}), "
                f"exactly round({target:g} x {prunable:,})"
            )
        else:
            approved = False
            reasons.append(
                f"sparsity: {zeros:,} of {prunable:,} weights are zero ({achieved:.6f}), "
                f"not the {expected:,} that target {target:g} asks for"
            )
    else:
        achieved = _number(metrics, "achieved_sparsity", "the metrics")
        if abs(achieved - target) <= 0.5 / max(1, int(manifest.get("prunable", 1))):
            reasons.append(f"sparsity: achieved {achieved:.6f} equals target {target:g}")
        else:
            approved = False
            reasons.append(f"sparsity: achieved {achieved:.6f} differs from target {target:g}")

    measured = (metrics.get("sparse_model") or {}).get("model_sha256")
    saved = manifest.get("model_sha256")
    if measured and saved and measured != saved:
        approved = False
        reasons.append(
            "identity: the metrics were measured on a different sparse model than this manifest's"
        )
    elif measured and saved:
        reasons.append(
            f"identity: metrics and manifest describe the same weights (sha256 {saved[:12]})"
        )
    return Decision(approved=approved, reasons=reasons)


@dataclass
class RegistryRequest:
    """What a registry receives: the model, its figures and the gate's decision (register
    only when ``decision.approved``)."""

    name: str
    sparse_dir: Path
    manifest: dict[str, Any]
    metrics: dict[str, Any]
    decision: Decision


Registry = Callable[[RegistryRequest], Mapping[str, Any] | None]


def load_registry(spec: str | Registry | None) -> tuple[Registry | None, str | None]:
    """A registry from a callable, a ``"module:function"`` string, or ``$FCPTS_REGISTRY``."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        spec = os.environ.get(REGISTRY_ENV) or None
    if spec is None:
        return None, None
    if callable(spec):
        return spec, getattr(spec, "__qualname__", repr(spec))
    module, sep, function = spec.strip().partition(":")
    if not sep or not module or not function:
        raise UserError(f"--registry must be module:function, got {spec!r}")
    import importlib

    try:
        target: Any = importlib.import_module(module)
    except ImportError as exc:
        raise UserError(f"registry module {module!r} cannot be imported ({exc})") from None
    for part in function.split("."):
        if not hasattr(target, part):
            raise UserError(f"registry module {module} has no {function!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserError(f"registry {spec} is not callable")
    return target, spec.strip()


@dataclass
class Registration:
    path: Path
    decision: Decision
    record: dict[str, Any]


def _load_metrics(metrics: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(metrics, Mapping):
        return dict(metrics)
    path = input_file_or_folder(metrics)
    if path.is_dir():
        path = path / "metrics.json"
    return read_json(
        path, "metrics file", "point --metrics to the --out folder of `fcpts evaluate`"
    )


def register(
    metrics: str | os.PathLike | Mapping[str, Any],
    sparse: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tolerance: float,
    registry: str | Registry | None = None,
    name: str | None = None,
    tracking: Tracking | None = None,
) -> Registration:
    """Gate the sparse model, record ``decision.json`` in ``out_dir``, and hand the decision
    to the registry (which registers approved models only).

    With ``tracking`` the registry defaults to MLflow's (:func:`fcpts.tracking.registry_hook`
    on the pipeline's MLflow run: a new version, alias ``challenger``, ``champion`` when it
    beats the champion); an explicit ``registry`` wins. The step's record and
    ``decision.json`` go to the run, which is then ended."""
    start = time.perf_counter()
    tolerance = check_tolerance(tolerance)
    data = _load_metrics(metrics)
    sparse_ref = str(sparse) if is_remote(sparse) else str(Path(sparse))
    sparse = input_folder(sparse)
    manifest = read_manifest(sparse)
    decision = gate(data, manifest, tolerance)
    if tracking is None:
        fn, registry_name = load_registry(registry)
    else:
        tracking = tracking.resolve(data, manifest)
        if registry is None:
            fn, registry_name = _mlflow_registry(tracking), MLFLOW_REGISTRY
        else:
            fn, registry_name = load_registry(registry)
    with failure_recorded(tracking, "register"):
        result = _register(
            data,
            manifest,
            decision,
            sparse,
            out_dir,
            tolerance,
            fn,
            registry_name,
            name,
            start,
            sparse_ref,
        )
    if tracking is not None:  # decision.json is written: now tracking may fail the step
        run = tracking.open()
        run.log_artifact(result.path, "registration")
        run.set_tags({TAG_COMMAND: result.record["command"]})
        finish_step(run, "register", result.record["step_seconds"])
    return result


def _mlflow_registry(tracking: Tracking) -> Registry:
    """MLflow's registry on the pipeline's run, which it opens only when called: after the
    gate's decision.json is written."""

    def registry(request: RegistryRequest) -> dict[str, Any]:
        from ..tracking.registry import registry_hook

        run = tracking.open()
        run.set_tags({TAG_STEP + "register": "running"})
        return registry_hook(run.run_id, tracking_uri=tracking.uri)(request)

    return registry


def _register(
    data: dict[str, Any],
    manifest: dict[str, Any],
    decision: Decision,
    sparse: str | os.PathLike,
    out_dir: str | os.PathLike,
    tolerance: float,
    fn: Registry | None,
    registry_name: str | None,
    name: str | None,
    start: float,
    sparse_ref: str,
) -> Registration:
    sources = manifest.get("sources") or {}
    model_name = name or default_model_name(
        str(sources.get("model", "model")), manifest.get("method")
    )
    record: dict[str, Any] = {
        "format": FORMAT,
        **decision.to_dict(tolerance),
        "name": model_name,
        "metric": data.get("metric"),
        "dense": data.get("dense"),
        "sparse": data.get("sparse"),
        "target": manifest.get("target"),
        "achieved_sparsity": data.get("achieved_sparsity"),
        "method": manifest.get("method"),
        "task": data.get("task") or manifest.get("task"),
        "task_reason": data.get("task_reason") or manifest.get("task_reason"),
        "sparse_model": {"path": sparse_ref, "model_sha256": manifest.get("model_sha256")},
        "registry": registry_name,
        "registration": None,
        "decided_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": reproduce_command(manifest, data, {"tolerance": tolerance, "name": model_name}),
    }
    record["step_seconds"] = round(time.perf_counter() - start, 3)
    path = _publish(out_dir, record)
    if fn is not None:
        verdict = "approved" if decision.approved else "rejected"
        Progress("register").note(f"{verdict} by the gate; handing it to {registry_name}")
        request = RegistryRequest(model_name, Path(sparse), manifest, data, decision)
        try:
            result = fn(request)
        except FcptsError as exc:
            record["registration"] = {
                "status": "failed",
                "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            }
            _publish(out_dir, record)
            raise
        except Exception as exc:
            record["registration"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            _publish(out_dir, record)
            raise ServiceError(
                f"registry {registry_name} failed: {type(exc).__name__}: {exc}"
            ) from exc
        status = "registered" if decision.approved else "rejection recorded by the registry"
        record["registration"] = {"status": status, **dict(result or {})}
    elif decision.approved:
        record["registration"] = {
            "status": "not registered: no registry configured (decision recorded only)"
        }
    else:
        record["registration"] = {"status": "not registered: rejected by the gate"}
    record["step_seconds"] = round(time.perf_counter() - start, 3)
    path = _publish(out_dir, record)
    return Registration(path=path, decision=decision, record=record)


def _publish(out_dir: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write decision.json to ``out_dir`` (a folder or ``s3://`` prefix), whole; its local path."""
    _, local = write_output(out_dir, lambda folder: write_json(folder / DECISION_FILE, record))
    return local / DECISION_FILE
