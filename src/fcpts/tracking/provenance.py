"""Where a pipeline run comes from: its id, the code's git commit, the model's digest."""

from __future__ import annotations

import contextlib
import getpass
import os
import re
import subprocess
import time
import uuid
from pathlib import Path

from torch import nn

from .. import __version__
from ..digests import tensors_sha256
from .names import TAG_GIT_COMMIT, TAG_GIT_DIRTY, TAG_PIPELINE_RUN_ID, TAG_VERSION


def new_pipeline_run_id() -> str:
    """A fresh pipeline run id: UTC time plus 8 random hex digits (sorts by start time)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def git_commit() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the git checkout fcpts runs from, or (None, None).

    ``$FCPTS_GIT_COMMIT`` wins (for images built without ``.git``). The checkout counts only
    when it tracks fcpts's own ``__init__.py``: a virtual environment inside some other
    repository does not lend fcpts that repository's commit.
    """
    env = os.environ.get("FCPTS_GIT_COMMIT", "").strip()
    if env:
        return env, None
    here = Path(__file__).resolve().parent.parent / "__init__.py"  # fcpts/__init__.py

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(
                ["git", "-C", str(here.parent), *args],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", here.name)
    if tracked is None or tracked.returncode != 0:
        return None, None
    head = git("rev-parse", "HEAD")
    if (
        head is None
        or head.returncode != 0
        or not re.fullmatch(r"[0-9a-f]{40}", head.stdout.strip())
    ):
        return None, None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return head.stdout.strip(), dirty


def model_digest(model: nn.Module) -> str:
    """``sha256:<hex>`` of a model's state_dict (names, dtypes, shapes and bytes), so two
    runs from the same weights share a digest whatever file they were read from."""
    return "sha256:" + tensors_sha256(sorted(model.state_dict().items()))


def standard_tags(pid: str) -> dict[str, str]:
    """The tags a new run starts with: pipeline run id, fcpts version, user, git commit."""
    tags = {
        TAG_PIPELINE_RUN_ID: pid,
        TAG_VERSION: __version__,
        "mlflow.source.name": "fcpts",
        "mlflow.source.type": "LOCAL",
    }
    with contextlib.suppress(Exception):
        tags["mlflow.user"] = getpass.getuser()
    commit, dirty = git_commit()
    if commit:
        tags[TAG_GIT_COMMIT] = commit
        tags["mlflow.source.git.commit"] = commit
    if dirty is not None:
        tags[TAG_GIT_DIRTY] = str(dirty).lower()
    return tags
