"""Where models and data come from: the source strings a user gives, resolved.

Model, weights and data sources may also be ``s3://bucket/key`` (an object) or
``s3://bucket/prefix/`` (a folder, e.g. a Hugging Face model or an ImageFolder tree):
downloaded once per version into a local cache (:mod:`fcpts.storage.cache`), then
resolved as the local path would be; the source string stays the URI.

Model sources (``--model``, :mod:`.models`):

* ``demo:minilm``, ``demo:digits-cnn``: the built-in demos (offline).
* a Hugging Face or sentence-transformers folder (``config.json`` at the top, or a
  ``modules.json`` naming the Transformer module's folder): loaded with its tokenizer.
* a TorchScript file (``torch.jit.save``): loaded with ``torch.jit.load``.
* ``package.module:function`` or ``path/to/file.py:function``: a function that builds the
  ``nn.Module``, with ``--weights`` a ``.safetensors`` file or a ``.pt``/``.pth``/``.bin``
  state_dict (read with ``torch.load(weights_only=True)``).

Data sources (``--data``, :mod:`.data`):

* a text file, one sentence per line (needs a model with a tokenizer); for a Hugging
  Face decoder the file is tokenised whole and cut into fixed-length token blocks
  (:mod:`.lm_text`);
* a folder of images in ImageFolder layout (``root/<class>/<image>``), labels from the
  sorted class folder names;
* tensors: ``.safetensors`` or ``.npz`` with key ``x`` (optional ``y`` labels), ``.npy``
  (``x`` only), ``.pt`` holding a tensor or a dict of tensors with ``x`` (optional ``y``);
* nothing, for the demos: their built-in splits.

Every sample of a user's data set lands in exactly one of three splits, fixed by a seeded
permutation: calibration (the first third), validation (the second) and evaluation (the
last), so calibration and evaluation never share a sample. Nothing is ever unpickled:
``.pt`` files are read with ``weights_only=True`` and ``.npy``/``.npz`` without pickle.

The task (``--task``, :mod:`.task_choice`) is given or inferred, with the reason recorded.
"""

from __future__ import annotations

from .data import sample_digests
from .files import local_path
from .lm_text import resolve_data
from .models import (
    ResolvedModel,
    load_weights,
    parse_function_source,
    resolve_model,
    state_digest,
)
from .scripted import layer_view
from .spec import DATA_FIELDS, DEMO_PREFIX, SPLITS, TASKS, Sources, flag_of
from .splits import DataSource, split_indices
from .task_choice import (
    TaskChoice,
    check_fit,
    check_labels,
    choose_task,
    evaluation_task,
    make_task,
    resolve_task,
    task_kind,
)

__all__ = [
    "DATA_FIELDS",
    "DEMO_PREFIX",
    "SPLITS",
    "TASKS",
    "DataSource",
    "ResolvedModel",
    "Sources",
    "TaskChoice",
    "check_fit",
    "check_labels",
    "choose_task",
    "flag_of",
    "evaluation_task",
    "layer_view",
    "load_weights",
    "local_path",
    "make_task",
    "parse_function_source",
    "resolve_data",
    "resolve_model",
    "resolve_task",
    "sample_digests",
    "split_indices",
    "state_digest",
    "task_kind",
]
