"""Where a result lives in MLflow, as the summaries and reports print it: UI links for an
http(s) tracking server, the run id and the ``models:/`` URI otherwise. Plain strings (the
files the steps write say the ids): no MLflow import."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import quote


def mlflow_page(tracking_uri: Any, page: str) -> str | None:
    """The MLflow UI's URL of ``page`` (``runs/<id>``, ``models/<name>/versions/<n>``) when
    the store is an http(s) server, else None."""
    uri = str(tracking_uri or "")
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri.rstrip('/')}/#/{page}"


def registration_rows(reg: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Where the registry put the model: for MLflow's, the run and the registered version
    (UI links for an http(s) store, else the run id and the models:/ URI)."""
    if not reg:
        return []
    if reg.get("registry") != "mlflow":
        return [("registry", ", ".join(f"{k}={v}" for k, v in reg.items()))]
    uri, run_id = reg.get("tracking_uri"), reg.get("run_id")
    run = mlflow_page(uri, f"runs/{run_id}") or f"run {run_id} in {uri}"
    name, version = reg.get("name"), reg.get("version")
    if version is None:
        return [
            ("mlflow run", run),
            ("registered", f"no: {reg.get('reason') or reg.get('status')}"),
        ]
    where = mlflow_page(uri, f"models/{quote(str(name), safe='')}/versions/{version}")
    role = "champion" if reg.get("champion") else reg.get("decision")
    created = "a new version" if reg.get("created") else "registered before, none added"
    return [
        ("mlflow run", run),
        (
            "registered",
            f"{name} version {version} ({created}), {role}: {where or reg.get('model_uri')}",
        ),
        ("why", str(reg.get("reason", ""))),
    ]


def tracking_line(record: Mapping[str, Any]) -> str:
    """The report's line for a step output's ``tracking`` block (pipeline run id,
    experiment, store): the MLflow run holding this result."""
    return (
        f"MLflow: the run of pipeline run {record.get('pipeline_run_id')} in experiment "
        f"{record.get('experiment')} (tag fcpts.pipeline_run_id), store {record.get('tracking_uri')}."
    )
