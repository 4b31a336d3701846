"""A checkpoint is resumed only when it is what fcpts wrote: its data, iteration and
fingerprint are checked (checksum and fields), and a bad one is refused with one line
that says to delete it; a checkpoint that cannot be written (disk full) says so and
leaves no empty folder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fcpts import checkpoint as ckpt
from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.errors import UserError

FINGERPRINT = {"settings": "a" * 64, "model": "b" * 64}


def _saved(tmp_path) -> ckpt.Checkpointer:
    checkpointer = ckpt.Checkpointer(ckpt.CheckpointConfig(tmp_path, resume=True))
    state = {"lam": 1.0, "moments": (torch.ones(3), torch.arange(4.0))}
    checkpointer.save(FINGERPRINT, ckpt.Snapshot(12, {"theta": torch.zeros(5)}, state))
    return checkpointer


def _rewrite(path, edit_meta=None, edit_tensors=None) -> None:
    """Write the checkpoint again with its header or tensors edited (a valid file)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()[ckpt._META_KEY])
    tensors = load_file(str(path))
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata={ckpt._META_KEY: json.dumps(meta)})


def _refused(checkpointer, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        checkpointer.load(FINGERPRINT)
    assert "delete it to start afresh" in str(info.value) and "\n" not in str(info.value)


def test_a_whole_checkpoint_loads(tmp_path):
    snapshot = _saved(tmp_path).load(FINGERPRINT)
    assert snapshot.iteration == 12 and torch.equal(snapshot.tensors["theta"], torch.zeros(5))
    assert torch.equal(snapshot.state["moments"][1], torch.arange(4.0))
    with pytest.raises(UserError, match="iteration 12 is beyond the 10 asked"):
        _saved(tmp_path).load(FINGERPRINT, total=10)


def test_edited_tensor_data_is_refused(tmp_path):
    checkpointer = _saved(tmp_path)
    _rewrite(checkpointer.path, edit_tensors=lambda t: t["theta"].add_(0.5))
    _refused(checkpointer, "checksum does not match its data")
    _rewrite(checkpointer.path, edit_tensors=lambda t: t.update(extra=torch.ones(1)))
    _refused(checkpointer, "checksum does not match")


@pytest.mark.parametrize("iteration", [10**9, 1e9, -5, "12", True, None])
def test_edited_or_bad_iteration_is_refused(tmp_path, iteration):
    checkpointer = _saved(tmp_path)
    _rewrite(checkpointer.path, edit_meta=lambda m: m.update(iteration=iteration))
    _refused(checkpointer, "checksum does not match|is not a whole number")


def _resealed(checkpointer, edit) -> None:
    """A header edited and its checksum computed again: only the field checks are left."""

    def edit_and_seal(meta):
        edit(meta)
        fields = {k: v for k, v in meta.items() if k != "checksum"}
        meta["checksum"] = ckpt.checksum(fields, load_file(str(checkpointer.path)))

    _rewrite(checkpointer.path, edit_meta=edit_and_seal)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.update(iteration=-5), "iteration -5 is not a whole number"),
        (lambda m: m.pop("iteration"), "iteration None is not a whole number"),
        (lambda m: m.update(fingerprint=["settings"]), "fingerprint is not a mapping"),
        (lambda m: m.pop("state"), "it has no state"),
        (
            lambda m: m["state"]["__dict__"][0].__setitem__(1, {"__tensor__": "nope"}),
            "refers to a tensor it lacks",
        ),
        (lambda m: m.update(state={"__tuple__": 3}), "malformed"),
    ],
)
def test_malformed_fields_are_refused(tmp_path, edit, match):
    checkpointer = _saved(tmp_path)
    _resealed(checkpointer, edit)
    _refused(checkpointer, match)


def test_sparsify_refuses_an_edited_checkpoint(tmp_path):
    demo = load_demo("demo:digits-cnn")
    batches = demo.split("calibration", 64, 32)
    kwargs = dict(task=demo.task, batches=batches, device="cpu", settings={"iters": 4})
    sparsify(demo.model, 0.8, checkpoint_dir=tmp_path, **kwargs)
    path = tmp_path / ckpt.FILE_NAME
    _rewrite(path, edit_tensors=lambda t: t["theta"].mul_(1.01))
    with pytest.raises(UserError, match="checksum does not match.*delete it to start afresh"):
        sparsify(demo.model, 0.8, checkpoint_dir=tmp_path, resume=True, **kwargs)


DISK_FULL = """
import resource, signal, sys, torch
from fcpts import checkpoint as ckpt
from fcpts.errors import UserError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
checkpointer = ckpt.Checkpointer(ckpt.CheckpointConfig(sys.argv[1]))
try:
    checkpointer.save({}, ckpt.Snapshot(1, {"w": torch.zeros(100_000)}, {}))
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


def test_a_full_disk_says_the_checkpoint_cannot_be_written(tmp_path):
    folder = tmp_path / "out.checkpoint"
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert f"cannot write the checkpoint {folder}" in proc.stdout
    assert "--checkpoint-dir" in proc.stdout and "Traceback" not in proc.stderr
    assert not folder.exists()  # no empty folder left
    existing = tmp_path / "mine"
    (existing / "notes.txt").parent.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(existing)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and existing.is_dir()  # a folder that existed stays
