"""Progress of every step, terminal or not: plain ``[fcpts] <step>: ...`` lines on stdout
at a bounded rate when stdout is not a terminal (here: captured), nothing with --quiet;
and the task each step used, given or inferred, in every summary."""

import json

import pytest

from fcpts.cli import main
from fcpts.errors import UserError
from fcpts.steps.progress import Progress, progress


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _lines(text: str, step: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(f"[fcpts] {step}:")]


def test_lines_come_every_tenth_and_at_the_end(capsys):
    clock = Clock()
    shown = Progress("calibrate", 100, "samples", "lines", min_seconds=0, clock=clock)
    for _ in range(20):
        clock.now += 1.5
        shown.update(5)
    shown.close()
    lines = _lines(capsys.readouterr().out, "calibrate")
    assert lines[0] == "[fcpts] calibrate: 10/100 samples, 3.0 s"
    assert [int(line.split()[2].split("/")[0]) for line in lines] == list(range(10, 101, 10))
    assert lines[-1] == "[fcpts] calibrate: 100/100 samples, 30.0 s"


def test_the_rate_is_bounded_both_ways(capsys):
    clock = Clock()
    # fast: the tenths come quicker than min_seconds (2 s), so every other one is shown
    shown = Progress("evaluate", 1000, "samples", "lines", what="dense outputs", clock=clock)
    for _ in range(1000):
        clock.now += 1 / 64
        shown.update(1)
    shown.close()
    lines = _lines(capsys.readouterr().out, "evaluate")
    assert all(line.startswith("[fcpts] evaluate: dense outputs ") for line in lines)
    assert [int(line.split()[4].split("/")[0]) for line in lines] == [200, 400, 600, 800, 1000]
    # slow, total unknown: a line at least every max_seconds
    shown = Progress("allocate", None, "iterations", "lines", clock=clock)
    for _ in range(4):
        clock.now += 20
        shown.update(1, loss=0.5)
    shown.close()
    lines = _lines(capsys.readouterr().out, "allocate")
    assert lines == [
        "[fcpts] allocate: 2 iterations, 40.0 s, loss 0.5000",
        "[fcpts] allocate: 4 iterations, 80.0 s, loss 0.5000",
    ]


def test_off_prints_nothing_and_an_unknown_mode_is_refused(capsys):
    assert list(progress(range(5), "calibrate", "off", 5)) == [0, 1, 2, 3, 4]
    Progress("register", mode="off").note("approved")
    assert capsys.readouterr().out == ""
    with pytest.raises(UserError, match="progress must be one of auto, bar, lines, off"):
        Progress("calibrate", mode="loud")


def test_every_step_shows_progress_and_the_task_without_a_terminal(tmp_path, capsys):
    cal, sparse, ev, dec = (str(tmp_path / d) for d in ("cal", "sparse", "ev", "dec"))
    common = ["--no-tracking", "--device", "cpu"]
    assert (
        main(["calibrate", "--model", "demo:digits-cnn", "--samples", "96", "--out", cal, *common])
        == 0
    )
    out = capsys.readouterr().out
    assert "[fcpts] calibrate: 96/96 samples, " in out
    assert "task classifier (inferred: the task of the demo demo:digits-cnn)" in out

    argv = ["allocate", "--calibration", cal, "--target", "0.5", "--iters", "12", "--out", sparse]
    assert main([*argv, *common]) == 0
    out = capsys.readouterr().out
    last = _lines(out, "allocate")[-1]
    assert last.startswith("[fcpts] allocate: 12/12 iterations, ") and "loss " in last
    assert _task_row(out) == "classifier (inferred: the task of the demo demo:digits-cnn)"

    argv = ["evaluate", "--model", "demo:digits-cnn", "--sparse", sparse, "--out", ev]
    assert main([*argv, "--latency-seconds", "0.01", "--samples", "64", *common]) == 0
    out = capsys.readouterr().out
    assert "[fcpts] evaluate: dense outputs 64/64 samples, " in out
    assert "[fcpts] evaluate: sparse outputs 64/64 samples, " in out
    assert _task_row(out) == "classifier (inferred: the task of the demo demo:digits-cnn)"

    argv = ["register", "--metrics", ev, "--sparse", sparse, "--out", dec, "--tolerance", "1"]
    assert main([*argv, "--no-tracking", "--registry", "tests.test_progress:accept"]) == 0
    out = capsys.readouterr().out
    assert "[fcpts] register: approved by the gate; handing it to tests.test_progress:accept" in out
    assert _task_row(out) == "classifier (inferred: the task of the demo demo:digits-cnn)"
    assert json.loads((tmp_path / "dec" / "decision.json").read_text())["task_reason"]

    # --quiet: no progress lines; a given task says so
    argv = ["evaluate", "--model", "demo:digits-cnn", "--sparse", sparse, "--out", ev, "--quiet"]
    assert main([*argv, "--task", "regression", "--latency-seconds", "0.01", *common]) == 0
    out = capsys.readouterr().out
    assert "[fcpts]" not in out and _task_row(out) == "regression (given: --task regression)"


def accept(request):
    """A registry for the test: records the name only."""
    return {"name": request.name}


def _task_row(summary: str) -> str:
    row = next(line for line in summary.splitlines() if line.split()[:1] == ["task"])
    return row.split(None, 1)[1]
