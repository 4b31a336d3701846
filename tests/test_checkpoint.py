"""Checkpoint and resume of the fcpts allocator: a resumed run equals an uninterrupted one.

The fault test runs a small allocation of demo:digits-cnn in a subprocess, SIGKILLs it at
random points (after a random checkpoint, plus a random delay), resumes until it
finishes, and compares masks, reconstructed weights and the loss history with an
uninterrupted run: bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from services import HANG_GUARD_S

from fcpts import checkpoint as ckpt
from fcpts.core import sparsify
from fcpts.demos import load_demo
from fcpts.errors import UserError

ITERS = 40
EVERY = 5

SCRIPT = """
import json, os, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import save_file
from fcpts.core import sparsify
from fcpts.demos import load_demo

checkpoints, out, iters, every = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
demo = load_demo("demo:digits-cnn")
calibration = demo.split("calibration", 128, 32)
alloc = sparsify(
    demo.model, 0.8, method="fcpts", score="wanda", task=demo.task, batches=calibration,
    device="cpu", settings={"iters": iters}, checkpoint_dir=checkpoints,
    checkpoint_every=every, resume=True,
)
tensors = {f"mask.{k}": v.to(torch.uint8) for k, v in alloc.masks.items()}
tensors.update({f"weight.{k}": v for k, v in alloc.weights.items()})
tensors.update({f"param.{k}": v for k, v in alloc.params.items()})
save_file(tensors, out + ".tmp", metadata={"history": json.dumps(alloc.history)})
os.replace(out + ".tmp", out)
"""


@pytest.fixture(scope="module")
def digits():
    demo = load_demo("demo:digits-cnn")
    return demo, demo.split("calibration", 128, 32)


def _run(digits, **kwargs):
    demo, calibration = digits
    return sparsify(
        demo.model,
        0.8,
        task=demo.task,
        batches=calibration,
        device="cpu",
        settings=kwargs.pop("settings", {"iters": 20}),
        **kwargs,
    )


def _same(a, b) -> None:
    assert a.masks.keys() == b.masks.keys()
    assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    for left, right in ((a.weights, b.weights), (a.params, b.params)):
        assert (left is None) == (right is None)
        if left is not None:
            assert left.keys() == right.keys()
            assert all(torch.equal(left[k], right[k]) for k in left)
    assert a.history == b.history
    assert a.zeros == b.zeros


class _Stop(Exception):
    pass


def _stop_at(iteration: int):
    def callback(it, record):
        if it == iteration:
            raise _Stop

    return callback


# ------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("joint", [True, False])
def test_resume_equals_uninterrupted_run(digits, tmp_path, joint):
    settings = {"iters": 20, "joint": joint}
    plain = _run(digits, settings=settings)
    with pytest.raises(_Stop):
        _run(
            digits,
            settings=settings,
            checkpoint_dir=tmp_path,
            checkpoint_every=3,
            callback=_stop_at(13),
        )
    with safe_open(str(tmp_path / ckpt.FILE_NAME), "pt") as f:
        assert json.loads(f.metadata()["fcpts.checkpoint"])["iteration"] == 12
    seen = []
    resumed = _run(
        digits,
        settings=settings,
        checkpoint_dir=tmp_path,
        checkpoint_every=3,
        resume=True,
        callback=lambda it, record: seen.append(it),
    )
    assert seen == list(range(12, 20))  # only the iterations after the checkpoint ran
    _same(plain, resumed)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.FILE_NAME]


def test_resume_from_the_final_checkpoint_runs_nothing(digits, tmp_path):
    first = _run(digits, checkpoint_dir=tmp_path, checkpoint_every=7)
    seen = []
    again = _run(
        digits, checkpoint_dir=tmp_path, resume=True, callback=lambda it, r: seen.append(it)
    )
    assert seen == []
    _same(first, again)


def test_resume_without_a_checkpoint_starts_afresh(digits, tmp_path):
    _same(_run(digits), _run(digits, checkpoint_dir=tmp_path / "new", resume=True))


def test_resume_with_other_arguments_is_refused(digits, tmp_path):
    with pytest.raises(_Stop):
        _run(digits, checkpoint_dir=tmp_path, checkpoint_every=2, callback=_stop_at(5))
    demo, calibration = digits
    with pytest.raises(UserError, match=r"other inputs \(differing: target\)"):
        sparsify(
            demo.model, 0.7, task=demo.task, batches=calibration, device="cpu",
            settings={"iters": 20}, checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip
    with pytest.raises(UserError, match=r"differing: settings\)"):
        _run(digits, settings={"iters": 20, "lam": 2.0}, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(UserError, match=r"differing: batches, scores\)"):
        sparsify(
            demo.model, 0.8, task=demo.task, batches=calibration[:2], device="cpu",
            settings={"iters": 20}, checkpoint_dir=tmp_path, resume=True,
        )  # fmt: skip
    # without resume the run starts afresh and overwrites the checkpoint
    _run(digits, settings={"iters": 20, "lam": 2.0}, checkpoint_dir=tmp_path)
    _run(digits, settings={"iters": 20, "lam": 2.0}, checkpoint_dir=tmp_path, resume=True)


def test_bad_checkpoint_arguments(digits, tmp_path):
    with pytest.raises(UserError, match="resume needs checkpoint_dir"):
        _run(digits, resume=True)
    for every in (0, -3, 2.5, True):
        with pytest.raises(UserError, match="checkpoint_every must be a whole number"):
            _run(digits, checkpoint_dir=tmp_path, checkpoint_every=every)
    (tmp_path / ckpt.FILE_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot be read.*delete it"):
        _run(digits, checkpoint_dir=tmp_path, resume=True)


def test_stale_temporary_files_are_removed(digits, tmp_path):
    stale = tmp_path / f".{ckpt.FILE_NAME}.tmp-0123"
    stale.write_bytes(b"half a checkpoint")
    _run(digits, checkpoint_dir=tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.FILE_NAME]


def test_storable_round_trip():
    tensors: dict[str, torch.Tensor] = {}
    value = {"a": (1, 2.5, None), "t": torch.arange(3), 7: [True, {"x": torch.ones(2)}]}
    stored = to_json = ckpt.to_storable(value, tensors, "s")
    assert json.loads(json.dumps(to_json)) == stored
    back = ckpt.from_storable(stored, tensors)
    assert back["a"] == (1, 2.5, None)
    assert torch.equal(back["t"], torch.arange(3))
    assert back[7][0] is True and torch.equal(back[7][1]["x"], torch.ones(2))
    with pytest.raises(TypeError, match="cannot store a object"):
        ckpt.to_storable(object(), {}, "s")


def test_fingerprint_names_each_input():
    a = ckpt.fingerprint({"x": torch.zeros(3), "y": {"k": [1, 2]}})
    b = ckpt.fingerprint({"x": torch.zeros(3, dtype=torch.float64), "y": {"k": [1, 2]}})
    assert a["y"] == b["y"] and a["x"] != b["x"]


# ---------------------------------------------------------------------- SIGKILL test


def _checkpoint_iteration(path: Path) -> int:
    try:
        with safe_open(str(path), "pt") as f:
            return int(json.loads(f.metadata()["fcpts.checkpoint"])["iteration"])
    except Exception:  # not written yet
        return 0


def _start(script: Path, checkpoints: Path, out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(script), str(checkpoints), str(out), str(ITERS), str(EVERY)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _finish(proc: subprocess.Popen) -> None:
    output = proc.communicate(timeout=HANG_GUARD_S)[0].decode(errors="replace")
    assert proc.returncode == 0, output[-2000:]


def _result(path: Path) -> tuple[dict[str, torch.Tensor], list]:
    with safe_open(str(path), "pt") as f:
        history = json.loads(f.metadata()["history"])
    return load_file(str(path)), history


def test_sigkill_and_resume_equals_uninterrupted_run(tmp_path):
    script = tmp_path / "allocate.py"
    script.write_text(SCRIPT)
    reference = tmp_path / "reference.safetensors"
    _finish(_start(script, tmp_path / "reference-checkpoints", reference))
    want, want_history = _result(reference)
    assert len(want_history) == ITERS

    for seed in range(3):
        rng = random.Random(seed)
        checkpoints = tmp_path / f"checkpoints-{seed}"
        out = tmp_path / f"out-{seed}.safetensors"
        file = checkpoints / ckpt.FILE_NAME
        kills = []
        # two kills per seed, each after a random checkpoint plus a random delay: the
        # first after checkpoint 5, 10 or 15, the second later but by checkpoint 30
        for last in (15, 30):
            resume_from = _checkpoint_iteration(file)
            kill_after = rng.randrange(resume_from + EVERY, last + 1, EVERY)
            delay = rng.uniform(0.0, 0.04)
            proc = _start(script, checkpoints, out)
            deadline = time.monotonic() + HANG_GUARD_S
            while proc.poll() is None and time.monotonic() < deadline:
                if _checkpoint_iteration(file) >= kill_after:
                    time.sleep(delay)
                    break
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=HANG_GUARD_S)
            kills.append((resume_from, kill_after, proc.returncode))
            assert not out.exists()
            assert _checkpoint_iteration(file) >= kill_after
        assert all(rc == -signal.SIGKILL for _, _, rc in kills), kills
        _finish(_start(script, checkpoints, out))
        got, history = _result(out)
        assert got.keys() == want.keys()
        differ = [k for k in want if not torch.equal(want[k], got[k])]
        assert differ == [], (seed, kills, differ)
        assert history == want_history
