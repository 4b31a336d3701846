"""A KFP cluster: its API URL, a validated ``fcpts submit``, and creating a run or a
recurring run of a compiled pipeline package with ``kfp.Client``."""

from __future__ import annotations

import contextlib
import re
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ServiceError, UserError
from .schedule import Schedule

PIPELINES = ("sparsify", "sweep")
DEFAULT_EXPERIMENT = "fcpts"


def check_host(host: str) -> str:
    """The KFP API URL, ``http(s)://host[:port][/path]``, without a trailing slash."""
    text = str(host or "").strip()
    where = "--host"
    if not text:
        raise UserError(f"{where} is required: the KFP API URL, e.g. http://localhost:8080")
    try:
        url = urllib.parse.urlsplit(text)
        port = url.port
    except ValueError as exc:
        raise UserError(
            f"{where} is not a valid URL ({exc}); e.g. https://kubeflow.example.com/pipeline"
        ) from None
    if url.scheme not in ("http", "https") or not url.hostname:
        raise UserError(
            f"{where} must start with http:// or https:// and name a host, e.g. http://localhost:8080"
        )
    if url.username is not None or url.password is not None or "@" in url.netloc:
        raise UserError(
            f"{where} must not carry credentials: give the URL without user:password@ and "
            "authenticate with KF_PIPELINES_SA_TOKEN_PATH or the cluster's login"
        )
    if url.query or url.fragment:
        raise UserError(f"{where} must not have a query or a fragment: give the API's base URL")
    if port == 0:
        raise UserError(f"{where} port must be 1-65535")
    return urllib.parse.urlunsplit((url.scheme, url.netloc, url.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class SubmitConfig:
    """A validated ``fcpts submit``."""

    host: str
    pipeline: str = "sparsify"
    schedule: Schedule | None = None
    experiment: str = DEFAULT_EXPERIMENT
    run_name: str | None = None
    namespace: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", check_host(self.host))
        if self.pipeline not in PIPELINES:
            raise UserError(
                f"--pipeline must be one of {', '.join(PIPELINES)}, got {self.pipeline!r}"
            )
        if not str(self.experiment).strip():
            raise UserError("--experiment is empty: give an experiment name, e.g. fcpts")
        if self.namespace is not None and not re.fullmatch(
            r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", self.namespace
        ):
            raise UserError(f"--namespace {self.namespace!r} is not a Kubernetes namespace name")


@contextlib.contextmanager
def kfp_errors(host: str, action: str) -> Iterator[None]:
    """KFP client failures as a ServiceError (or UserError) naming the host."""
    try:
        yield
    except (UserError, ServiceError):
        raise
    except Exception as exc:
        status = getattr(exc, "status", None)
        if isinstance(status, int) and status:
            reason = getattr(exc, "reason", "") or ""
            if status in (401, 403):
                raise UserError(
                    f"cannot {action}: the KFP API at {host} refused the request ({status} "
                    f"{reason}); log in or set KF_PIPELINES_SA_TOKEN_PATH to a service-account token"
                ) from None
            if status == 404:
                raise UserError(
                    f"cannot {action}: no KFP API at {host} (404); check --host, e.g. "
                    "http://localhost:8080 or https://kubeflow.example.com/pipeline"
                ) from None
            raise ServiceError(
                f"cannot {action}: the KFP API at {host} answered {status} {reason}"
            ) from None
        import urllib3.exceptions

        if isinstance(exc, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            raise ServiceError(
                f"cannot {action}: cannot reach the KFP API at {host} "
                f"({type(exc).__name__}); check --host and that the cluster is up"
            ) from None
        raise


def load_pipeline(name: str, cluster: Any = None) -> Any:
    """The pipeline function of ``pipelines/<name>.py`` in the checkout (with retries), its
    steps where ``cluster`` (:class:`~fcpts.steps.options.ClusterOptions`) says."""
    import importlib
    import sys

    from .pipeline import project_root

    root = str(project_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(f"pipelines.{name}").build(retries=True, cluster=cluster)


def submit(
    config: SubmitConfig, package: str | Path, arguments: Mapping[str, Any], client: Any = None
) -> dict[str, str]:
    """Create the run (or recurring run) of a compiled pipeline package; return its kind,
    id, name and UI link."""
    import warnings

    import kfp

    run_name = config.run_name or f"fcpts-{config.pipeline}-{time.strftime('%Y%m%d-%H%M%S')}"
    ui = f"{config.host}/#"
    if client is None:
        with kfp_errors(config.host, "connect"), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            client = kfp.Client(host=config.host, namespace=config.namespace or "kubeflow")
    if config.schedule is None:
        with kfp_errors(config.host, f"submit the {config.pipeline} pipeline"):
            result = client.create_run_from_pipeline_package(
                str(package),
                arguments=dict(arguments),
                run_name=run_name,
                experiment_name=config.experiment,
                namespace=config.namespace,
            )
        run_id = str(result.run_id)
        return {"kind": "run", "id": run_id, "name": run_name, "url": f"{ui}/runs/details/{run_id}"}
    with kfp_errors(config.host, f"schedule the {config.pipeline} pipeline"):
        experiment = client.create_experiment(config.experiment, namespace=config.namespace)
        job = client.create_recurring_run(
            experiment_id=experiment.experiment_id,
            job_name=run_name,
            cron_expression=config.schedule.cron,
            interval_second=config.schedule.interval_second,
            params=dict(arguments),
            pipeline_package_path=str(package),
            max_concurrency=1,
            no_catchup=True,
        )
    job_id = str(job.recurring_run_id)
    url = f"{ui}/recurringrun/details/{job_id}"
    return {"kind": "recurring run", "id": job_id, "name": run_name, "url": url}
