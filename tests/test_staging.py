"""Local staging folders: a killed writer's folder is removed by the next run, a live
writer's is not (it holds a lock), and an earlier output that a kill stranded mid-swap is
put back rather than deleted."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from fcpts.steps.common import write_output
from fcpts.storage import local
from fcpts.storage.outputs import staged_output

HOLD = """
import sys, time
from pathlib import Path
from fcpts.storage import local
with local.staging(Path(sys.argv[1]), sys.argv[2]) as tmp:
    (tmp / "part").write_bytes(b"x")
    print(tmp, flush=True)
    if sys.argv[3] == "kill":
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(600)
"""


def _hold(parent, name, mode) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(parent), name, mode], stdout=subprocess.PIPE, text=True
    )


def _litter(parent, name="out") -> list[str]:
    return sorted(p.name for p in parent.glob(f".{name}{local.TMP_MARKER}*"))


@pytest.mark.parametrize("rerun", ["staged_output", "write_output"])
def test_a_killed_writers_folder_goes_with_the_next_run(tmp_path, rerun):
    proc = _hold(tmp_path, "out", "kill")
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert len(_litter(tmp_path)) == 1
    if rerun == "staged_output":
        with staged_output(tmp_path / "out") as folder:
            (folder / "a.txt").write_text("done")
    else:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")  # a non-empty output folder
        write_output(tmp_path / "out", lambda folder: (folder / "a.txt").write_text("done"))
    assert _litter(tmp_path) == [] and (tmp_path / "out" / "a.txt").read_text() == "done"


def test_a_live_writers_folder_is_kept(tmp_path):
    proc = _hold(tmp_path, "out", "sleep")
    try:
        held = proc.stdout.readline().strip()
        local.remove_abandoned(tmp_path, "out")
        with staged_output(tmp_path / "out") as folder:
            (folder / "a.txt").write_text("other")
        assert _litter(tmp_path) == [held.rsplit("/", 1)[-1]]
    finally:
        proc.kill()
        proc.communicate(timeout=60)
    deadline = time.monotonic() + 60
    while _litter(tmp_path) and time.monotonic() < deadline:
        local.remove_abandoned(tmp_path, "out")
    assert _litter(tmp_path) == []


def test_legacy_and_other_names_are_left_alone_or_removed(tmp_path):
    (tmp_path / ".out.fcpts-stage-0123").mkdir()  # an earlier fcpts's staging name
    (tmp_path / ".other.fcpts-tmp-0123").mkdir()  # another output's: not ours to judge
    (tmp_path / ".out-notes").mkdir()  # not a staging name
    local.remove_abandoned(tmp_path, "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.fcpts-tmp-0123", ".out-notes"]


def test_an_output_stranded_mid_swap_is_put_back(tmp_path):
    old = tmp_path / f".out{local.TMP_MARKER}{local.OLD}0123"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"earlier output")
    local.remove_abandoned(tmp_path, "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"earlier output"
    assert _litter(tmp_path) == []
