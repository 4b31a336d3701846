"""Kubernetes secrets for the pipeline steps, as environment variables (kfp-kubernetes).

Credentials never travel as pipeline parameters (they would show in the KFP UI and in
the compiled spec); each step gets them from Kubernetes secrets in its namespace,
referenced by name in the compiled spec's platform section:

* ``fcpts-s3`` (every step): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``, for
  ``s3://`` sources and outputs.
* ``fcpts-mlflow`` (every step): ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``,
  ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_S3_ENDPOINT_URL``.
* ``fcpts-optuna-db`` (the sweep steps): ``FCPTS_OPTUNA_STORAGE``, the study's
  SQLAlchemy URL with its password.

Each secret key becomes the environment variable of the same name, and every reference
is optional: a missing secret or key leaves the variable unset, so a cluster without
S3 or MLflow runs the same spec. The secret names are read at compile time from
``FCPTS_K8S_S3_SECRET``, ``FCPTS_K8S_MLFLOW_SECRET`` and ``FCPTS_K8S_OPTUNA_SECRET``
(an empty value drops that secret).

Create them with e.g.::

    kubectl create secret generic fcpts-s3 \\
        --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...
"""

from __future__ import annotations

import os
from collections.abc import Mapping

SECRETS = {  # kind: (environment variable naming the secret, default name, keys)
    "s3": (
        "FCPTS_K8S_S3_SECRET",
        "fcpts-s3",
        (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL_S3",
        ),
    ),
    "mlflow": (
        "FCPTS_K8S_MLFLOW_SECRET",
        "fcpts-mlflow",
        (
            "MLFLOW_TRACKING_URI",
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
            "MLFLOW_S3_ENDPOINT_URL",
        ),
    ),
    "optuna": ("FCPTS_K8S_OPTUNA_SECRET", "fcpts-optuna-db", ("FCPTS_OPTUNA_STORAGE",)),
}
_STEPS = ("calibrate", "allocate", "evaluate", "register")
_SWEEP_STEPS = ("sweep-prepare", "sweep-worker", "sweep-best")
STEP_SECRETS = {
    **{step: ("s3", "mlflow") for step in _STEPS},
    **{step: ("s3", "mlflow", "optuna") for step in _SWEEP_STEPS},
}


def secret_names(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Secret name per kind (s3, mlflow, optuna); a kind set to "" is left out."""
    env = os.environ if environ is None else environ
    names = {kind: env.get(var, default).strip() for kind, (var, default, _) in SECRETS.items()}
    return {kind: name for kind, name in names.items() if name}


def secret_env(step: str, environ: Mapping[str, str] | None = None) -> dict[str, dict[str, str]]:
    """``{secret name: {secret key: environment variable}}`` for a step."""
    if step not in STEP_SECRETS:
        raise ValueError(f"unknown pipeline step {step!r}: one of {', '.join(STEP_SECRETS)}")
    names = secret_names(environ)
    return {
        names[kind]: {key: key for key in SECRETS[kind][2]}
        for kind in STEP_SECRETS[step]
        if kind in names
    }


def use_secrets(task, step: str, environ: Mapping[str, str] | None = None):
    """Map the step's secrets to environment variables of ``task``; returns the task."""
    from kfp import kubernetes

    for name, key_to_env in secret_env(step, environ).items():
        kubernetes.use_secret_as_env(
            task, secret_name=name, secret_key_to_env=key_to_env, optional=True
        )
    return task
