"""The MLflow pyfunc of a logged sparse model, logged as code ("models from code").

MLflow copies this file into the logged model and runs it when the model loads, so it
imports only what the model needs (numpy, torch, and transformers or sentence-transformers
for a text encoder), never fcpts. fcpts never imports it: :mod:`fcpts.tracking.model_log`
passes its path. The model's folder is the artifact ``folder``; its ``serving.json`` says
how to load and call it:

* ``sentence-transformers``: ``SentenceTransformer(folder)``; input a list of sentences,
  output their embeddings (2-D float32);
* ``transformers-encoder``: ``AutoModel`` and ``AutoTokenizer`` of the folder, mean pooling
  over real tokens, L2-normalised (as fcpts's encoder task); input and output as above;
* ``torch-export`` (``model.pt2``) or ``torchscript`` (``model.pt``): input one array, or
  a mapping of the input names to arrays; output the model's first output.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np

SPEC_FILE = "serving.json"
TEXT_KINDS = ("sentence-transformers", "transformers-encoder")


def _sentences(data) -> list[str]:
    if isinstance(data, str):
        return [data]
    if hasattr(data, "iloc"):  # a pandas DataFrame or Series: its first column
        data = data.iloc[:, 0] if data.ndim == 2 else data
    if isinstance(data, np.ndarray):
        data = data.reshape(-1)
    sentences = [str(s) for s in list(data)]
    if not sentences:
        raise ValueError("the input holds no sentence: send a list of strings")
    return sentences


class SparseModel(mlflow.pyfunc.PythonModel):
    """Loads the folder as ``serving.json`` says and predicts on what users send."""

    def load_context(self, context) -> None:
        import torch

        folder = Path(context.artifacts["folder"])
        self.spec = json.loads((folder / SPEC_FILE).read_text())
        kind = self.spec["kind"]
        if kind == "sentence-transformers":
            from sentence_transformers import SentenceTransformer

            self.model = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        elif kind == "transformers-encoder":
            from transformers import AutoModel, AutoTokenizer

            path = folder / self.spec.get("path", "")
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            self.model = AutoModel.from_pretrained(str(path), local_files_only=True).eval()
        elif kind == "torch-export":
            self.model = torch.export.load(str(folder / self.spec["file"])).module()
        elif kind == "torchscript":
            self.model = torch.jit.load(str(folder / self.spec["file"]), map_location="cpu").eval()
        else:
            raise ValueError(f"unknown serving kind {kind!r} in {SPEC_FILE}")

    def predict(self, context, model_input, params=None):
        import torch

        kind = self.spec["kind"]
        if kind == "sentence-transformers":
            out = self.model.encode(_sentences(model_input), convert_to_numpy=True)
            return np.asarray(out, dtype=np.float32)
        if kind == "transformers-encoder":
            return self._encode(_sentences(model_input))
        names = self.spec["inputs"]
        if isinstance(model_input, dict):
            arrays = [np.asarray(model_input[n]) for n in names]
        else:
            arrays = [np.asarray(model_input)]
        with torch.no_grad():
            out = self.model(*[torch.from_numpy(np.ascontiguousarray(a)) for a in arrays])
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.detach().cpu().numpy()

    def _encode(self, sentences: list[str]) -> np.ndarray:
        import torch

        enc = self.tokenizer(
            sentences,
            padding=True,
            truncation=True,
            max_length=int(self.spec.get("max_length", 512)),
            return_tensors="pt",
        )
        with torch.no_grad():
            hidden = self.model(**enc)[0]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).numpy().astype(np.float32)


mlflow.models.set_model(SparseModel())
