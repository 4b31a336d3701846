"""The sparse model as an MLflow pyfunc that serves what its users send.

The logged model's artifact ``folder`` is the allocate output folder (the source's own
format, :mod:`fcpts.export.folder`), plus ``serving.json`` and, for a model that takes
tensors, ``model.pt2`` (``torch.export``). The pyfunc's code is
:mod:`fcpts.tracking.pyfunc_model`, logged as code: loading and serving the model needs
torch (and transformers / sentence-transformers for a text encoder), never fcpts. A text
encoder's input is a list of sentences and its output their embeddings (2-D float32);
any other model's input is its tensors as arrays and its output its first output.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..export.folder import COMPRESSED_FILE, st_transformer_path
from ..export.onnx import is_encoder
from ..export.program import export_program
from .names import TAG_MODEL_ID, TAG_MODEL_URI

if TYPE_CHECKING:
    from .tracking import PipelineRun

MODEL_NAME = "sparse_model"
ARTIFACT = "folder"
PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")  # run by MLflow only, never imported
SPEC_FILE = "serving.json"  # read by pyfunc_model.py
EXAMPLE_SENTENCES = ("An example sentence to embed.", "Another sentence.")
MAX_LENGTH = 64  # as fcpts's text demos tokenize


def log_model(
    run: PipelineRun,
    model: nn.Module,
    example: Any,
    *,
    task: Any = None,
    name: str = MODEL_NAME,
    folder: str | Path | None = None,
) -> str:
    """Log ``model`` as a pyfunc logged model of ``run`` and return its URI
    (``models:/m-...``, also the run tag ``fcpts.model_uri``).

    ``folder`` is the allocate output folder of ``model``; one with a tokenizer makes a
    text encoder served on sentences. ``example`` is one batch (``task.split`` turns it
    into the call arguments when a task is given); its first two rows give the signature
    and input example of a tensor model."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        model = copy.deepcopy(model).to("cpu")
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory(prefix="fcpts-pyfunc-") as tmp:
            art = Path(tmp) / ARTIFACT
            if folder is not None:
                shutil.copytree(folder, art)
            else:
                art.mkdir()
            if _is_text(art):
                spec, signature, example_in, pip = _text(model, art)
            else:
                spec, signature, example_in, pip = _tensors(model, art, example, task)
            (art / SPEC_FILE).write_text(json.dumps(spec, indent=2))
            with run.store.fluent(run.experiment_id):
                info = run.store.call(
                    "log the sparse model",
                    mlflow.models.Model.log,
                    artifact_path=None,
                    name=name,
                    flavor=_Flavor(
                        torch_file=spec.get("file") if spec["kind"] == "torch-export" else None
                    ),
                    run_id=run.run_id,
                    python_model=str(PYFUNC_CODE),
                    artifacts={ARTIFACT: str(art)},
                    signature=signature,
                    input_example=example_in,
                    pip_requirements=pip,
                )
    finally:
        model.train(was_training)
    run.set_tags({TAG_MODEL_URI: info.model_uri, TAG_MODEL_ID: info.model_id})
    return info.model_uri


class _Flavor:
    """``mlflow.pyfunc`` for :meth:`mlflow.models.Model.log`, plus MLflow's PyTorch flavour
    pointing at the folder's ``model.pt2`` when there is one, so that
    ``mlflow.pytorch.load_model`` returns the sparse model as a module too."""

    __name__ = "mlflow.pyfunc"

    def __init__(self, torch_file: str | None) -> None:
        self.torch_file = torch_file

    def save_model(self, path: str, mlflow_model: Any, **kwargs: Any) -> None:
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        data = Path(path) / "artifacts" / ARTIFACT
        if self.torch_file and (data / self.torch_file).is_file():
            mlflow_model.add_flavor(
                "pytorch",
                model_data=f"artifacts/{ARTIFACT}",
                pytorch_version=str(torch.__version__),
            )
            mlflow_model.save(str(Path(path) / "MLmodel"))


def _pinned(*packages: str) -> list[str]:
    """``name==version`` of the installed packages (local version labels like +cpu cut)."""
    return [f"{p}=={metadata.version(p).split('+')[0]}" for p in packages]


def _is_text(folder: Path) -> bool:
    sub = st_transformer_path(folder)
    base = folder / (sub or "")
    return (base / "config.json").is_file() and (
        (base / "tokenizer.json").is_file() or (base / "tokenizer_config.json").is_file()
    )


def _text(model: nn.Module, art: Path):
    """A text encoder: sentences in, embeddings out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    sub = st_transformer_path(art)
    if sub is not None and (art / sub / COMPRESSED_FILE).is_file():
        model.save_pretrained(str(art / sub))  # a compressed folder: dense weights to serve
    packages = ["torch", "transformers", "safetensors", "numpy"]
    if sub is not None:
        spec = {"kind": "sentence-transformers"}
        packages.append("sentence-transformers")
    else:
        spec = {"kind": "transformers-encoder", "path": "", "max_length": MAX_LENGTH}
        if (art / COMPRESSED_FILE).is_file():
            model.save_pretrained(str(art))
    dim = int(getattr(model.config, "hidden_size", -1))
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, dim))]),
    )
    return spec, signature, list(EXAMPLE_SENTENCES), _pinned(*packages)


def _tensors(model: nn.Module, art: Path, example: Any, task: Any):
    """A tensor model: ``model.pt2`` (or its TorchScript file), arrays in, arrays out."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    args, kwargs = _example_args(example, task)
    if isinstance(model, torch.jit.ScriptModule):
        if not (art / "model.pt").is_file():
            torch.jit.save(model, str(art / "model.pt"))
        spec = {"kind": "torchscript", "file": "model.pt"}
        inputs = {f"input_{i}": a for i, a in enumerate(args)} | kwargs
    else:
        try:
            path, graph = export_program(model, art, args, kwargs)
        except Exception as exc:  # torch.export cannot trace this model
            raise UserError(
                f"the sparse model cannot be logged for serving: torch.export failed "
                f"({str(exc).splitlines()[0][:200]}); give a TorchScript source"
            ) from None
        spec = {"kind": "torch-export", "file": path.name}
        inputs = graph.inputs
    spec["inputs"] = list(inputs)
    with torch.no_grad():
        out = model(*inputs.values())
    out = out.last_hidden_state if hasattr(out, "last_hidden_state") else out
    out = out[0] if isinstance(out, (tuple, list)) else out
    seq = 2 if is_encoder(model) else 1
    specs = [
        TensorSpec(t.numpy().dtype, (-1, *(-1 for _ in t.shape[1:seq]), *t.shape[seq:]), name=n)
        for n, t in inputs.items()
    ]
    out_np = out.detach().numpy()
    output = TensorSpec(out_np.dtype, (-1, *out_np.shape[1:]))
    if len(specs) == 1:
        specs = [TensorSpec(specs[0].type, specs[0].shape)]
        example_in: Any = next(iter(inputs.values())).numpy()
    else:
        example_in = {n: t.numpy() for n, t in inputs.items()}
    signature = ModelSignature(inputs=Schema(specs), outputs=Schema([output]))
    return spec, signature, example_in, _pinned("torch", "numpy")


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
