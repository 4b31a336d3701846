"""Kubernetes secrets for the pipeline steps, as environment variables (kfp-kubernetes).

Credentials never travel as pipeline parameters (they would show in the KFP UI and in
the compiled spec); each step gets them from Kubernetes secrets in its namespace,
referenced by name in the compiled spec's platform section:

* ``fcpts-s3`` (every step): ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL_S3``, for
  ``s3://`` sources and outputs.
* ``fcpts-mlflow`` (every step): ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``,
  ``MLFLOW_TRACKING_PASSWORD``, ``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_S3_ENDPOINT_URL``. A
  step whose ``tracking_uri`` parameter is empty tracks to that ``MLFLOW_TRACKING_URI``
  (none there: no tracking); ``tracking_uri`` ``none`` turns tracking off.
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

Where the steps run (:class:`fcpts.steps.options.ClusterOptions`, fixed at compile time by
``fcpts compile``/``fcpts submit`` flags, see :func:`cluster_options`): the image
(``--image``, else ``$FCPTS_IMAGE``, else :data:`components.IMAGE`); ``--gpu N``
requests N accelerators (``--gpu-type``, default ``nvidia.com/gpu``, with a toleration of
that taint) for the steps that run the allocator and runs them in the CUDA image
(``--cuda-image``, else ``$FCPTS_CUDA_IMAGE``, else the image with ``-cuda`` appended);
``--checkpoint-pvc NAME`` mounts that PersistentVolumeClaim into allocate at
:data:`CHECKPOINT_MOUNT` and points ``$FCPTS_CHECKPOINT_ROOT`` at it, where the step
checkpoints in a folder per KFP run, so a retry in a new pod resumes.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping

from fcpts.errors import UserError
from fcpts.steps.entry import CHECKPOINT_ROOT_ENV
from fcpts.steps.options import ClusterOptions

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


IMAGE_ENV, CUDA_IMAGE_ENV = "FCPTS_IMAGE", "FCPTS_CUDA_IMAGE"
CHECKPOINT_MOUNT = "/opt/fcpts/checkpoints"  # created for uid 1000 in components/Dockerfile
GPU_STEPS = ("allocate", "sweep-worker")  # the steps that run the allocator
CHECKPOINT_STEPS = ("allocate",)
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
IMAGE_RE = re.compile(
    rf"{_COMPONENT}(?::[0-9]+)?(?:/{_COMPONENT})*(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?"
    r"(?:@sha256:[0-9a-f]{64})?"
)
PVC_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _image(flag: str, value: str) -> str:
    if not IMAGE_RE.fullmatch(value):
        raise UserError(
            f"{flag} {value!r} is not an image reference: give [registry/]name[:tag], e.g. "
            "registry.example.com/team/fcpts:1.0 (lower-case name, no spaces)"
        )
    return value


def cluster_options(
    options: ClusterOptions | None = None, environ: Mapping[str, str] | None = None
) -> ClusterOptions:
    """``options`` checked, with the images resolved: the flag, else the environment
    variable, else the default (see the module docstring)."""
    from components import IMAGE

    env = os.environ if environ is None else environ
    given = options or ClusterOptions()
    image = _image(
        "--image" if given.image else f"${IMAGE_ENV}",
        (given.image or env.get(IMAGE_ENV, "") or IMAGE).strip(),
    )
    cuda = (given.cuda_image or env.get(CUDA_IMAGE_ENV, "")).strip()
    if not cuda and "@" in image and given.gpu:
        raise UserError(
            f"--gpu needs a CUDA image and {image} is pinned by digest, so none is named after "
            "it: give --cuda-image (or $FCPTS_CUDA_IMAGE)"
        )
    cuda = _image("--cuda-image" if given.cuda_image else "the CUDA image", cuda or f"{image}-cuda")
    if isinstance(given.gpu, bool) or not isinstance(given.gpu, int) or given.gpu < 0:
        raise UserError(
            f"--gpu must be a whole number of accelerators, 0 or more; got {given.gpu!r}"
        )
    gpu_type = str(given.gpu_type or "").strip()
    if given.gpu and not re.fullmatch(r"[\w./-]+", gpu_type):
        raise UserError(
            f"--gpu-type {gpu_type!r} is not a Kubernetes resource name: e.g. nvidia.com/gpu"
        )
    pvc = str(given.checkpoint_pvc or "").strip()
    if pvc and (len(pvc) > 253 or not PVC_RE.fullmatch(pvc)):
        raise UserError(
            f"--checkpoint-pvc {pvc!r} is not a PersistentVolumeClaim name: lower-case letters, "
            "digits, - and ., e.g. fcpts-checkpoints"
        )
    return dataclasses.replace(
        given, image=image, cuda_image=cuda, gpu_type=gpu_type, checkpoint_pvc=pvc or None
    )


def step_image(cluster: ClusterOptions, step: str) -> str:
    """The image ``step`` runs in: the CUDA one where it gets accelerators."""
    return cluster.cuda_image if cluster.gpu and step in GPU_STEPS else cluster.image


def use_cluster(task, step: str, cluster: ClusterOptions):
    """Accelerators and the checkpoint volume of ``step`` (the image is the component's,
    see ``pipelines.common.in_image``); returns the task."""
    from kfp import kubernetes

    if cluster.gpu and step in GPU_STEPS:
        task.set_accelerator_type(cluster.gpu_type).set_accelerator_limit(cluster.gpu)
        kubernetes.add_toleration(
            task, key=cluster.gpu_type, operator="Exists", effect="NoSchedule"
        )
    if cluster.checkpoint_pvc and step in CHECKPOINT_STEPS:
        kubernetes.mount_pvc(task, pvc_name=cluster.checkpoint_pvc, mount_path=CHECKPOINT_MOUNT)
        task.set_env_variable(CHECKPOINT_ROOT_ENV, CHECKPOINT_MOUNT)
    return task
