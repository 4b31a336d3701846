"""The fcpts command line: the contract other tools rely on, config files, bad input."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from bad_inputs import alias_bomb
from conftest import run_fcpts
from safetensors.torch import load_file, save_file

from fcpts.cli import build_parser, main

SUBCOMMANDS = ("calibrate", "allocate", "evaluate", "register", "run", "compile")


def test_help_explains_every_option(capsys):
    parser = build_parser()
    for command in SUBCOMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([command, "--help"])
        assert exc.value.code == 0
        text = capsys.readouterr().out
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{command} {action.option_strings} has no help"
                assert action.option_strings[0] in text
    assert main([]) == 2


def test_allocate_and_evaluate_contract(tmp_path):
    sparse, metrics_dir = tmp_path / "sparse", tmp_path / "eval"
    r = run_fcpts(
        "allocate",
        "--model",
        "demo:digits-cnn",
        "--target",
        "0.6",
        "--method",
        "erk",
        "--score",
        "magnitude",
        "--seed",
        "1",
        "--calibration-samples",
        "64",
        "--out",
        sparse,
    )
    assert r.returncode == 0, r.stderr
    assert "target 0.6, achieved 0.599997" in r.stdout and "densest" in r.stdout
    m = json.loads((sparse / "manifest.json").read_text())
    for key in ("target", "achieved_sparsity", "zeros", "prunable", "method", "score", "layers"):
        assert key in m
    assert (m["method"], m["score"], m["target"]) == ("erk", "magnitude", 0.6)
    state = load_file(str(sparse / "model.safetensors"))
    for layer in m["layers"]:
        assert set(layer) >= {"name", "numel", "zeros", "sparsity"}
        assert int((state[layer["name"] + ".weight"] == 0).sum()) == layer["zeros"]
    assert sum(layer["zeros"] for layer in m["layers"]) == m["zeros"] == round(0.6 * m["prunable"])

    r = run_fcpts(
        "evaluate",
        "--model",
        "demo:digits-cnn",
        "--sparse",
        sparse,
        "--out",
        metrics_dir,
        "--evaluation-samples",
        "100",
        "--latency-seconds",
        "0.05",
    )
    assert r.returncode == 0, r.stderr
    metrics = json.loads((metrics_dir / "metrics.json").read_text())
    for key in ("metric", "dense", "sparse", "achieved_sparsity"):
        assert key in metrics
    assert metrics["metric"] == "top1" and metrics["achieved_sparsity"] == m["achieved_sparsity"]
    assert "quality    top1" in r.stdout and "vs dense" in r.stdout

    r = run_fcpts(
        "register",
        "--metrics",
        metrics_dir,
        "--sparse",
        sparse,
        "--tolerance",
        "1",
        "--out",
        tmp_path / "reg",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "reg" / "decision.json").read_text())["approved"] is True


def test_config_file_equals_flags_and_flags_win(tmp_path, capsys):
    flags = tmp_path / "flags"
    assert (
        main(
            [
                "allocate",
                "--model",
                "demo:digits-cnn",
                "--target",
                "0.7",
                "--method",
                "fcpts",
                "--iters",
                "3",
                "--no-joint",
                "--keep-dense",
                "features.0",
                "--calibration-samples",
                "64",
                "--out",
                str(flags),
            ]
        )
        == 0
    )
    config = tmp_path / "fcpts.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "demo:digits-cnn",
                "target": 0.5,
                "method": "fcpts",
                "keep-dense": ["features.0"],
                "calibration_samples": 64,
                "settings": {"joint": False},
                "allocate": {"iters": 3},  # a command's own section overrides the top level
                "tolerance": 0.1,  # an option of other commands: ignored by allocate
            }
        )
    )
    from_config = tmp_path / "config"
    assert (
        main(["allocate", "--config", str(config), "--target", "0.7", "--out", str(from_config)])
        == 0
    )
    a = json.loads((flags / "manifest.json").read_text())
    b = json.loads((from_config / "manifest.json").read_text())
    for key in ("target", "zeros", "method", "score", "layers", "weights_reconstructed"):
        assert a[key] == b[key], key
    assert b["settings"]["iters"] == 3 and b["settings"]["joint"] is False
    assert b["layers"][0]["name"] == "features.0" and b["layers"][0]["zeros"] == 0
    assert (
        load_file(str(flags / "model.safetensors")).keys()
        == load_file(str(from_config / "model.safetensors")).keys()
    )

    bad = tmp_path / "bad.yaml"
    bad.write_text("targett: 0.5\n")
    assert main(["allocate", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "unknown option 'targett'" in capsys.readouterr().err


def _two_gib() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))


@pytest.mark.parametrize(
    "config",
    [
        f"target: {alias_bomb()}\n",
        f"model: {alias_bomb()}\n",
        f"settings: {{lam: {alias_bomb()}}}\n",
    ],
    ids=["target", "model", "settings"],
)
def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path, config):
    import subprocess
    import sys

    from services import HANG_GUARD_S

    path = tmp_path / "bomb.yaml"
    path.write_text(config)
    assert path.stat().st_size < 1000
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fcpts.cli",
            "allocate",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,  # a hang guard: the memory limit is what stops a blow-up
        preexec_fn=_two_gib,
    )
    assert r.returncode == 2, r.stderr[-2000:]
    _one_error_line(r.stderr, "its YAML aliases (*name) expand it to more than 1 MiB")
    assert len(r.stderr) < 1000


def test_yaml_aliases_within_the_budget_and_recursive_ones(tmp_path, capsys):
    from fcpts.cli.config import load_config

    shared = tmp_path / "shared.yaml"
    shared.write_text("model: &m demo:digits-cnn\nrun: {model: *m, target: 0.5}\n")
    assert load_config(str(shared))["run"]["model"] == "demo:digits-cnn"
    loop = tmp_path / "loop.yaml"
    loop.write_text("settings: &s {lam: *s}\n")
    assert main(["allocate", "--config", str(loop), "--out", str(tmp_path / "o")]) == 2
    _one_error_line(capsys.readouterr().err, "a YAML alias refers to a value that contains it")


def test_config_that_is_not_a_small_regular_file(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * 110_000 + "target: 0.5\n")
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    cases = {
        big: "is larger than 1 MiB, the limit for a config file",
        tmp_path: "is a folder, not a regular file",
        "/dev/zero": "is a character device, not a regular file",
        fifo: "is a named pipe (FIFO), not a regular file",
        tmp_path / "missing.yaml": "does not exist",
    }
    for path, message in cases.items():
        assert main(["allocate", "--config", str(path), "--out", str(tmp_path / "o")]) == 2
        _one_error_line(capsys.readouterr().err, message)
    assert not (tmp_path / "o").exists()


def test_config_error_shows_a_bounded_value(tmp_path, capsys):
    long = tmp_path / "long.yaml"
    long.write_text("target: [" + ", ".join(["0.5"] * 50_000) + "]\n")
    assert main(["allocate", "--config", str(long), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    _one_error_line(err, "target must be a single float, got [0.5, 0.5")
    assert len(err) < 500


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-inputs")
    np.save(root / "rgb.npy", np.zeros((30, 3, 32, 32), dtype=np.float32))
    (root / "corrupt.safetensors").write_bytes(b"\xff\x00\x00\x00\x00\x00\x00\x00{garbage")
    save_file({"x": torch.zeros(30, 1, 8, 8)}, str(root / "ok.safetensors"))
    return root


# The five mistakes the brief names run the real CLI in a subprocess; the rest run
# in-process (same main(), same exit code and stderr) to keep the suite fast.
BAD_CASES = {
    "unknown model source": (
        ["allocate", "--model", "no-such-model", "--target", "0.5", "--out", "{tmp}/o"],
        "unknown model source",
    ),
    "missing data file": (
        [
            "calibrate",
            "--model",
            "demo:digits-cnn",
            "--data",
            "{tmp}/missing.npy",
            "--out",
            "{tmp}/o",
        ],
        "does not exist",
    ),
    "wrong data shape": (
        [
            "allocate",
            "--model",
            "demo:digits-cnn",
            "--data",
            "{bad}/rgb.npy",
            "--target",
            "0.5",
            "--method",
            "uniform",
            "--out",
            "{tmp}/o",
        ],
        "does not fit the model",
    ),
    "corrupt weights": (
        [
            "calibrate",
            "--model",
            "fcpts.demos.digits:DigitsCNN",
            "--weights",
            "{bad}/corrupt.safetensors",
            "--out",
            "{tmp}/o",
        ],
        "not a readable safetensors",
    ),
    "target out of range": (
        [
            "allocate",
            "--model",
            "demo:digits-cnn",
            "--target",
            "1.5",
            "--method",
            "uniform",
            "--out",
            "{tmp}/o",
        ],
        "target sparsity must be strictly between 0 and 1",
    ),
}
MORE_BAD_CASES = {
    "unknown demo": (["calibrate", "--model", "demo:resnet", "--out", "{tmp}/o"], "unknown demo"),
    "missing weights": (
        [
            "calibrate",
            "--model",
            "fcpts.demos.digits:DigitsCNN",
            "--weights",
            "{tmp}/none.pt",
            "--out",
            "{tmp}/o",
        ],
        "does not exist",
    ),
    "corrupt data": (
        [
            "calibrate",
            "--model",
            "demo:digits-cnn",
            "--data",
            "{bad}/corrupt.safetensors",
            "--out",
            "{tmp}/o",
        ],
        "not a readable safetensors",
    ),
    "unknown method": (
        [
            "allocate",
            "--model",
            "demo:digits-cnn",
            "--target",
            "0.5",
            "--method",
            "magic",
            "--out",
            "{tmp}/o",
        ],
        "unknown method 'magic'",
    ),
    "unknown setting": (
        [
            "allocate",
            "--model",
            "demo:digits-cnn",
            "--target",
            "0.5",
            "--set",
            "itters=3",
            "--out",
            "{tmp}/o",
        ],
        "no setting 'itters'",
    ),
    "target missing": (
        ["allocate", "--model", "demo:digits-cnn", "--out", "{tmp}/o"],
        "--target is required",
    ),
    "bad bounds": (
        [
            "allocate",
            "--model",
            "demo:digits-cnn",
            "--target",
            "0.5",
            "--bounds",
            "features.0",
            "--out",
            "{tmp}/o",
        ],
        "PATTERN=MIN:MAX",
    ),
    "run with a missing file": (
        ["run", "--model", "demo:digits-cnn", "--data", "{tmp}/nothing.pt", "--root", "{tmp}/runs"],
        "does not exist",
    ),
    "run with a bad target": (
        ["run", "--model", "demo:digits-cnn", "--target", "0", "--root", "{tmp}/runs"],
        "target sparsity",
    ),
    "negative tolerance": (
        ["run", "--model", "demo:digits-cnn", "--tolerance", "-1", "--root", "{tmp}/runs"],
        "--tolerance must be a finite number >= 0",
    ),
    "missing metrics": (
        ["register", "--metrics", "{tmp}/none", "--sparse", "{tmp}", "--out", "{tmp}/r"],
        "does not exist",
    ),
}


def _one_error_line(stderr, message):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("fcpts: error: ") and message in lines[-1], stderr
    assert "Traceback" not in stderr
    assert len([line for line in lines if line.startswith("fcpts: error")]) == 1


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_exit_2(case, bad_inputs, tmp_path):
    args, message = BAD_CASES[case]
    r = run_fcpts(*[a.format(tmp=tmp_path, bad=bad_inputs) for a in args])
    assert r.returncode == 2, (r.returncode, r.stderr)
    _one_error_line(r.stderr, message)


@pytest.mark.parametrize("case", list(MORE_BAD_CASES))
def test_more_bad_input_in_process(case, bad_inputs, tmp_path, capsys):
    args, message = MORE_BAD_CASES[case]
    assert main([a.format(tmp=tmp_path, bad=bad_inputs) for a in args]) == 2
    _one_error_line(capsys.readouterr().err, message)


def test_corrupt_sparse_model_is_refused(tmp_path):
    sparse = tmp_path / "sparse"
    assert (
        main(
            [
                "allocate",
                "--model",
                "demo:digits-cnn",
                "--target",
                "0.5",
                "--method",
                "global",
                "--calibration-samples",
                "32",
                "--out",
                str(sparse),
            ]
        )
        == 0
    )
    with open(sparse / "model.safetensors", "r+b") as fh:
        fh.seek(-64, 2)
        fh.write(b"\x00" * 16)
    r = run_fcpts(
        "evaluate", "--model", "demo:digits-cnn", "--sparse", sparse, "--out", tmp_path / "eval"
    )
    assert (
        r.returncode == 2
        and "does not match the sha256" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_argparse_errors_exit_2():
    r = run_fcpts("allocate", "--target", "not-a-number")
    assert r.returncode == 2 and "invalid float value" in r.stderr and "Traceback" not in r.stderr
    r = run_fcpts("frobnicate")
    assert r.returncode == 2
