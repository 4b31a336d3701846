"""The sparse model as an MLflow PyTorch model: ``pt2`` (torch.export) when it traces, else
pickled."""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import mlflow
import torch
from torch import nn

from .. import __version__
from ..errors import ServiceError, UserError
from .names import TAG_MODEL_ID, TAG_MODEL_URI

if TYPE_CHECKING:
    from .tracking import PipelineRun

log = logging.getLogger(__name__)
MODEL_NAME = "sparse_model"


def log_model(
    run: PipelineRun,
    model: nn.Module,
    example: Any,
    *,
    task: Any = None,
    name: str = MODEL_NAME,
) -> str:
    """Log ``model`` with MLflow's PyTorch flavour as a logged model of ``run`` and
    return its URI (``models:/m-...``, also the run tag ``fcpts.model_uri``).

    ``example`` is one batch (``task.split`` turns it into the call arguments when a task
    is given); its first two rows become the input example and the signature (batch
    dimension -1). A model that takes tensors positionally is saved in MLflow's
    ``pt2`` format (``torch.export``: loading it unpickles nothing and needs no fcpts
    code); one that takes keyword arguments or that ``torch.export`` cannot trace is
    pickled instead (loading it needs fcpts and the model's code installed).
    """
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import Schema, TensorSpec

    args, kwargs = _example_args(example, task)
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
        arrays = {k: v.numpy() for k, v in kwargs.items()}
        out_np = out.detach().numpy() if isinstance(out, torch.Tensor) else None
        pip = [f"torch=={torch.__version__.split('+')[0]}"]
        info = None
        if not kwargs:
            signature = infer_signature(args[0].numpy(), out_np)
            if len(args) > 1:
                signature = ModelSignature(
                    inputs=Schema(
                        [
                            TensorSpec(a.numpy().dtype, (-1, *a.shape[1:]), name=f"input_{i}")
                            for i, a in enumerate(args)
                        ]
                    ),
                    outputs=signature.outputs,
                )
            try:
                with run.store.fluent(run.experiment_id):
                    info = run.store.call(
                        "log the sparse model",
                        mlflow.pytorch.log_model,
                        model,
                        name=name,
                        signature=signature,
                        input_example=args[0].numpy()
                        if len(args) == 1
                        else tuple(a.numpy() for a in args),
                        pip_requirements=pip,
                        serialization_format="pt2",
                        run_id=run.run_id,
                    )
            except ServiceError:
                raise
            except Exception as exc:  # torch.export could not trace this model
                log.warning(
                    "torch.export failed (%s); logging the model pickled",
                    str(exc).splitlines()[0][:200],
                )
        if info is None:
            example_in = arrays or (
                args[0].numpy()
                if len(args) == 1
                else {f"input_{i}": a.numpy() for i, a in enumerate(args)}
            )
            signature = infer_signature(example_in, out_np)
            with run.store.fluent(run.experiment_id):
                info = run.store.call(
                    "log the sparse model",
                    mlflow.pytorch.log_model,
                    model,
                    name=name,
                    signature=signature,
                    input_example=example_in,
                    pip_requirements=[*pip, f"fcpts=={__version__}"],
                    serialization_format="pickle",
                    run_id=run.run_id,
                )
    finally:
        model.train(was_training)
    run.set_tags({TAG_MODEL_URI: info.model_uri, TAG_MODEL_ID: info.model_id})
    return info.model_uri


def _example_args(
    example: Any, task: Any
) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """(args, kwargs) of a model call on the first two rows of ``example`` (one row is
    repeated: ``torch.export`` keeps the batch dimension dynamic only when it is > 1)."""
    if task is not None:
        args, kwargs = task.split(example)
    elif isinstance(example, Mapping) and "x" in example:
        args, kwargs = (example["x"],), {}
    elif isinstance(example, Mapping):
        args, kwargs = (), dict(example)
    elif isinstance(example, (list, tuple)):
        args, kwargs = tuple(example), {}
    else:
        args, kwargs = (example,), {}

    def rows(t: Any) -> torch.Tensor:
        if not isinstance(t, torch.Tensor):
            raise UserError(f"the example batch must hold tensors, got {type(t).__name__}")
        t = t.detach().to("cpu")
        if t.dim() == 0:
            raise UserError(
                "the example batch holds a 0-d tensor: give a batch with a batch dimension"
            )
        t = t[:2]
        return torch.cat([t, t]) if t.shape[0] == 1 else t

    return tuple(rows(a) for a in args), {k: rows(v) for k, v in kwargs.items()}
