"""Hyperparameter sweeps (fcpts.sweep): workers sharing a PostgreSQL study with MLflow
nested runs, the exact-target constraint, resuming, best.json, the CLI and the pipeline.

Small on purpose: demo:digits-cnn, 64 calibration samples, 20-24 iterations, one torch
thread per worker (the test machine may be busy).
"""

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path

import optuna
import pytest
import yaml
from services import HANG_GUARD_S

from fcpts import sweep as sw
from fcpts.errors import UserError
from fcpts.sources import Sources

MODEL = "demo:digits-cnn"
TARGET = 0.7
SMALL = {
    "space": {"iters": "20:24"},
    "calibration_samples": 64,
    "batch_size": 32,
    "validation_samples": 96,
    "eval_batch_size": 96,
    "report_every": 10,
    "pruner_startup_trials": 2,
    "threads": 1,
    "heartbeat_interval": 1,
    "grace_period": 2,
}
CONTRACT = ("value", "params", "trial", "score", "baseline", "metric", "trials", "study")


SPEC_FIELDS = {f.name for f in dataclasses.fields(sw.SweepSpec)}


def _sweep(out, trials, target=TARGET, **kwargs):
    """A sweep of the digits demo: ``kwargs`` are SweepSpec fields or run_sweep options."""
    options = dict(SMALL, **kwargs)
    spec = {k: options.pop(k) for k in list(options) if k in SPEC_FIELDS}
    space = sw.SearchSpace.from_overrides(spec.pop("space", None)).to_dict()
    spec = sw.SweepSpec(sources=Sources(model=MODEL), target=target, space=space, **spec)
    return sw.run_sweep(spec, trials, out_dir=out, **options)


@pytest.fixture(autouse=True)
def _no_ambient_mlflow(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def first_sweep(tmp_path_factory):
    """Two trials (the baseline and one sampled) in out/study.db, no MLflow."""
    out = tmp_path_factory.mktemp("sweep-first")
    result = _sweep(out, 2, tracking_uri="")
    return out, result


# ------------------------------------------------------------------ workers + MLflow


def test_two_workers_share_a_postgres_study(postgres, mlflow_sqlite_server, tmp_path):
    import mlflow

    url = postgres.create_database("fcpts_sweep_workers")
    uri = mlflow_sqlite_server.tracking_uri
    result = _sweep(
        tmp_path / "out", 4, storage=url, study_name="digits-workers", workers=2, tracking_uri=uri
    )
    study = optuna.load_study(study_name="digits-workers", storage=url)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(4)) and len(set(numbers)) == 4
    assert {t.state.name for t in trials} <= {"COMPLETE", "PRUNED"}
    assert trials[0].user_attrs.get("baseline") is True  # the enqueued defaults came first

    best = result.best
    feasible = [t for t in trials if t.state.name == "COMPLETE" and sw.is_feasible(t)]
    assert best["value"] == max(t.value for t in feasible)
    assert best["storage"] == url and best["trials"]["total"] == 4

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent_id = best["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["best.trial"] == str(best["trial"])
    assert parent.data.tags["best.score"] == best["score"]
    assert float(parent.data.tags["best.lam"]) == best["params"]["lam"]
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"best.json", "study.png"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    by_number = {}
    for run in children:
        n = int(run.data.tags["optuna.trial_number"])
        assert n not in by_number, f"trial {n} logged twice"
        by_number[n] = run
    assert sorted(by_number) == list(range(4))
    for t in trials:
        run = by_number[t.number]
        assert run.data.tags["optuna.state"] == t.state.name
        assert run.info.status == ("FINISHED" if t.state.name == "COMPLETE" else "KILLED")
        assert set(run.data.params) == {"lam", "lr", "weight_lr", "iters", "ste_width", "score"}
        if t.state.name == "COMPLETE":
            assert run.data.metrics["value"] == pytest.approx(t.value)


# ------------------------------------------------------------------------ constraint


def _fake_spec_study(storage):
    study = optuna.create_study(study_name="fake", storage=storage, direction="maximize")
    study.set_user_attr(
        sw.ATTR_SPEC, sw.SweepSpec(sources=Sources(model=MODEL), target=TARGET).to_dict()
    )
    study.set_user_attr(sw.ATTR_METRIC, "top1")
    return study


def _trial(value, constraint=None, state=optuna.trial.TrialState.COMPLETE, **attrs):
    dists = {
        "lam": optuna.distributions.FloatDistribution(0.1, 10, log=True),
        "score": optuna.distributions.CategoricalDistribution(["magnitude", "wanda"]),
    }
    params = {"lam": 1.0 + value, "score": "wanda"}
    system = {} if constraint is None else {"constraints:exact_target": constraint}
    user = dict(attrs)
    if constraint is not None:
        user["constraint"] = [constraint]
    return optuna.trial.create_trial(
        params=params,
        distributions=dists,
        value=value if state == optuna.trial.TrialState.COMPLETE else None,
        intermediate_values={10: 2.0} if state == optuna.trial.TrialState.PRUNED else None,
        state=state,
        user_attrs=user,
        system_attrs=system,
    )


def test_an_off_target_trial_is_never_best(tmp_path):
    storage = f"sqlite:///{tmp_path / 'fake.db'}"
    study = _fake_spec_study(storage)
    study.add_trials(
        [
            _trial(0.80, 0.0, baseline=True),
            _trial(0.99, 0.001),  # the highest value, but 0.1% of the weights off target
            _trial(0.85, 0.0),
            _trial(0.0, state=optuna.trial.TrialState.PRUNED),  # pruned: its value is a loss
            _trial(0.95, 0.0, state=optuna.trial.TrialState.FAIL),
        ]
    )
    trials = study.get_trials()
    assert not sw.is_feasible(trials[1]) and sw.is_feasible(trials[2])
    assert sw.select_best(trials).number == 2
    best = sw.finish_sweep(storage, "fake", tmp_path / "out", plot=False)
    assert best["trial"] == 2 and best["value"] == 0.85
    assert best["trials"]["infeasible"] == 1 and best["baseline"]["value"] == 0.80
    assert json.loads((tmp_path / "out" / "best.json").read_text())["trial"] == 2
    # no feasible complete trial at all: no best.json, an error that says so
    only_bad = optuna.create_study(study_name="bad", storage=storage, direction="maximize")
    only_bad.set_user_attr(
        sw.ATTR_SPEC, sw.SweepSpec(sources=Sources(model=MODEL), target=TARGET).to_dict()
    )
    only_bad.add_trial(_trial(0.99, 0.5))
    with pytest.raises(sw.FcptsError, match="no feasible complete trial"):
        sw.finish_sweep(storage, "bad", tmp_path / "bad", plot=False)
    assert not (tmp_path / "bad" / "best.json").exists()


def test_real_trials_off_target_are_infeasible_for_the_sampler(tmp_path, monkeypatch):
    calls = []

    def gap(allocation, target):  # the first trial (the baseline) lands 3 zeros off
        calls.append(1)
        return 3 if len(calls) == 1 else 0

    monkeypatch.setattr(sw.objective, "landing_gap", gap)  # where Objective looks it up
    result = _sweep(tmp_path / "out", 3, tracking_uri="", pruner_startup_trials=5)
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    first = study.trials[0]
    assert first.state.name == "COMPLETE" and first.user_attrs["baseline"]
    assert first.constraints["exact_target"] > 0  # what TPESampler reads
    assert first.user_attrs["constraint"][0] == pytest.approx(3 / first.user_attrs["prunable"])
    assert result.best["trial"] != 0
    assert result.best["trials"]["infeasible"] == 1
    assert result.best["baseline"]["feasible"] is False


def test_runs_of_different_lengths_report_at_the_same_fractions():
    from fcpts.sweep.objective import checkpoints

    assert checkpoints(200, 200, 20) == {i: i for i in range(20, 201, 20)}  # as before
    assert checkpoints(400, 200, 20) == {2 * i: i for i in range(20, 201, 20)}
    assert list(checkpoints(265, 200, 20).values()) == list(range(20, 201, 20))
    assert max(checkpoints(265, 200, 20)) == 265  # the last report is the end of the run
    assert checkpoints(5, 5, 20) == {5: 20}  # shorter than one window: one report, at the end


def _claim_enqueued(url, barrier, queue, rounds):
    """Worker of the race test: at each round, ask for a trial at the same moment as the
    other process, report its number, finish it."""
    study = optuna.load_study(study_name="race", storage=sw.open_storage(url))
    for r in range(rounds):
        barrier.wait()
        try:
            trial = study.ask()
            queue.put((r, trial.number))
            study.tell(trial, 1.0)
        except Exception as exc:  # reported, not raised: the parent asserts
            queue.put((r, f"{type(exc).__name__}: {exc}"))
        barrier.wait()


def test_sqlite_workers_never_claim_one_enqueued_trial_twice(tmp_path):
    """Two local processes popping enqueued trials at the same instant: without BEGIN
    IMMEDIATE SQLite lets both claim one trial (then one crashes on tell)."""
    import multiprocessing

    url = sw.storage_url(tmp_path / "race.db", None)
    rounds = 10
    study = optuna.create_study(study_name="race", storage=sw.open_storage(url))
    for r in range(rounds):
        study.enqueue_trial({}, user_attrs={"round": r})
    ctx = multiprocessing.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_claim_enqueued, args=(url, barrier, queue, rounds)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=HANG_GUARD_S) for _ in range(2 * rounds)]
    for p in procs:
        p.join(timeout=HANG_GUARD_S)
    errors = [n for _, n in results if isinstance(n, str)]
    assert not errors
    numbers = [n for _, n in results]
    assert len(set(numbers)) == 2 * rounds  # every claim got its own trial
    assert all(p.exitcode == 0 for p in procs)


# ------------------------------------------------------------------- resume + stale


def test_resume_continues_numbering_and_fails_stale_trials(first_sweep, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no tracking URI: nothing may appear here (no ./mlruns)
    out0, _ = first_sweep
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(out0 / "study.db", out / "study.db")  # resume a copy of the 2-trial study
    before = (out0 / "best.json").read_text()
    result = _sweep(out, 2, tracking_uri="")
    study = optuna.load_study(study_name=result.study_name, storage=result.storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert result.best["trials"]["total"] == 4
    written = json.loads((out / "best.json").read_text())
    assert written["trials"]["total"] == 4 and written != json.loads(before)
    assert sum(t.user_attrs.get("baseline", False) for t in study.trials) == 1  # not re-enqueued

    # a worker killed mid-trial: RUNNING, heartbeat stopped
    storage = sw.open_storage(result.storage, heartbeat_interval=1, grace_period=2)
    with warnings.catch_warnings():  # ask() outside optimize() warns about heartbeats
        warnings.simplefilter("ignore")
        killed = optuna.load_study(study_name=result.study_name, storage=storage).ask()
    storage.record_heartbeat(killed._trial_id)
    time.sleep(3.5)
    result = _sweep(out, 1, tracking_uri="")
    trials = optuna.load_study(study_name=result.study_name, storage=result.storage).trials
    assert [t.number for t in trials] == [0, 1, 2, 3, 4, 5]
    assert trials[4].state.name == "FAIL"
    assert trials[5].system_attrs.get("failed_trial") == 4  # re-queued, then run
    assert trials[5].state.name in ("COMPLETE", "PRUNED")
    assert result.best["trials"] == {**result.best["trials"], "total": 6, "fail": 1}
    assert not (tmp_path / "mlruns").exists()


def test_resume_with_other_options_is_refused(first_sweep):
    out, result = first_sweep
    with pytest.raises(UserError, match="target"):
        _sweep(out, 1, target=0.5, study_name=result.study_name, tracking_uri="")


# -------------------------------------------------------------------- best.json


def test_best_json_feeds_sparsify_and_allocate(first_sweep, tmp_path):
    from fcpts.core import sparsify
    from fcpts.demos import load_demo
    from fcpts.steps import Sources, allocate, calibrate

    out, result = first_sweep
    best = sw.load_best(out)
    for key in CONTRACT:
        assert key in best, key
    assert best["baseline"]["trial"] == 0 and isinstance(best["baseline"]["value"], float)
    assert best["baseline"]["params"]["iters"] == 24  # the default 200, clipped into 20:24
    assert best["metric"] == "top1" and 0 <= best["value"] <= 1
    assert best["objective_split"] == "validation" and best["target"] == TARGET
    assert set(best["params"]) >= {"lam", "lr", "weight_lr", "iters", "ste_width"}
    assert best["score"] in ("magnitude", "wanda")
    assert (out / "study.png").stat().st_size > 5000
    assert result.best["value"] == best["value"]

    score, settings = sw.best_settings(best)
    demo = load_demo(MODEL)
    batches = demo.split("calibration", 64, 32)
    allocation = sparsify(
        demo.model, TARGET, score=score, task=demo.task, batches=batches, settings=settings
    )
    assert allocation.zeros == round(TARGET * allocation.prunable)

    # the same settings through the allocate step, from the allocate.json config
    config = json.loads((out / "allocate.json").read_text())
    assert config["settings"] == settings and config["score"] == score
    cal = calibrate(Sources(model=MODEL), tmp_path / "cal", score=score, samples=64, batch_size=32)
    done = allocate(
        cal, tmp_path / "sparse", target=TARGET, score=score, settings=config["settings"]
    )
    assert done.manifest["settings"]["lam"] == settings["lam"] and done.manifest["exact"]


def test_plot_handles_fewer_than_two_trials(tmp_path):
    path = sw.plot_study([], tmp_path / "empty.png")
    assert path.stat().st_size > 1000


# --------------------------------------------------------------------------- CLI


def test_cli_writes_best_json(tmp_path, capsys):
    from fcpts.cli import main

    out = tmp_path / "out"
    code = main(
        ["sweep", "--model", MODEL, "--target", "0.6", "--trials", "1", "--out", str(out),
         "--space", "iters=20:20", "--calibration-samples", "64", "--batch-size", "32",
         "--validation-samples", "64", "--threads", "1", "--quiet"]
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    best = json.loads((out / "best.json").read_text())
    assert best["trial"] == 0 and best["params"]["iters"] == 20 and best["target"] == 0.6
    assert "best: trial 0" in captured.out and "allocate.json" in captured.out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--target", "0.5", "--trials", "1", "--out", "X"], "--model is required"),
        (["--model", MODEL, "--target", "0.5", "--trials", "1", "--out", "X",
          "--storage", "ftp://host/db"], "not a database URL"),
        (["--model", MODEL, "--target", "0.5", "--trials", "1", "--out", "X",
          "--space", "lam=0:1"], "0 < LO <= HI"),
        (["--model", MODEL, "--target", "0.5", "--trials", "1", "--out", "X",
          "--set", "lam=2"], "--space lam=X:X"),
    ],
)  # fmt: skip
def test_cli_bad_input_exits_2(args, message, capsys, tmp_path, monkeypatch):
    from fcpts.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["sweep", *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_wires_into_a_parent_parser():
    import argparse

    from fcpts.cli import sweep as sweep_cli

    parser = argparse.ArgumentParser(prog="fcpts")
    sub = parser.add_subparsers(dest="command")
    sweep_cli.add_parser(sub)
    args = parser.parse_args(["sweep", "--model", MODEL, "--target", "0.5", "--trials", "3",
                              "--workers", "2", "--storage", "sqlite:///x.db", "--out", "d"])  # fmt: skip
    assert args.command == "sweep" and args.workers == 2 and args.trials == 3
    assert "sqlite" in parser._subparsers._group_actions[0].choices["sweep"].format_help()


def test_fcpts_cli_sweep_config_then_allocate_evaluate_register(first_sweep, tmp_path, capsys):
    """`fcpts sweep --config` resumes the first sweep's study (0 more trials) and writes the
    best.json contract; `fcpts allocate --config allocate.json` reproduces the best trial,
    and the result goes on through `fcpts evaluate` and `fcpts register` as usual."""
    from fcpts import cli

    out0, result = first_sweep
    config = {
        "model": MODEL,
        "target": TARGET,
        "space": ["iters=20:24"],
        "calibration_samples": 64,
        "batch_size": 32,
        "validation_samples": 96,
        "eval_batch_size": 96,
        "report_every": 10,
        "threads": 1,
        "quiet": True,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    code = cli.main(["sweep", "--config", str(tmp_path / "sweep.yaml"), "--trials", "0",
                     "--storage", str(out0 / "study.db"), "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    best = json.loads((out / "best.json").read_text())
    assert best["trials"]["total"] == 2 and best["study"] == result.study_name
    for key in ("value", "params", "trial"):
        assert best[key] is not None, key
    assert isinstance(best["baseline"]["value"], float) and best["baseline"]["trial"] == 0
    assert best["improvement_over_baseline"] == pytest.approx(
        best["value"] - best["baseline"]["value"]
    )

    sparse, evaluation, decision = (tmp_path / d for d in ("sparse", "eval", "reg"))
    code = cli.main(["allocate", "--config", str(out / "allocate.json"), "--out", str(sparse),
                     "--no-tracking", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((sparse / "manifest.json").read_text())
    assert manifest["score"] == best["score"] and manifest["exact"]
    assert {k: manifest["settings"][k] for k in best["params"]} == best["params"]

    code = cli.main(["evaluate", "--model", MODEL, "--sparse", str(sparse), "--out",
                     str(evaluation), "--latency-seconds", "0.05", "--no-tracking", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((evaluation / "metrics.json").read_text())
    assert metrics["evaluation"]["split"] == "evaluation" and metrics["metric"] == "top1"
    code = cli.main(["register", "--metrics", str(evaluation), "--sparse", str(sparse),
                     "--tolerance", "0.5", "--out", str(decision), "--no-tracking", "--quiet"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert json.loads((decision / "decision.json").read_text())["approved"] is True


# ---------------------------------------------------------------------- pipeline


def test_sweep_pipeline_compiles_with_parallel_workers(tmp_path):
    from pipelines.sweep import compile_sweep

    path = compile_sweep(str(tmp_path / "sweep.yaml"))
    spec = next(yaml.safe_load_all(Path(path).read_text()))
    tasks = spec["root"]["dag"]["tasks"]
    (loop,) = [name for name, t in tasks.items() if "parameterIterator" in t]
    assert tasks[loop]["parameterIterator"]["items"]["inputParameter"].endswith(
        "sweep-prepare-Output"
    )
    inner = spec["components"][tasks[loop]["componentRef"]["name"]]["dag"]["tasks"]
    assert list(inner) == ["sweep-worker"]
    assert inner["sweep-worker"]["inputs"]["parameters"]["worker"][
        "componentInputParameter"
    ].endswith("loop-item")

    def deps(name):
        return set(tasks[name].get("dependentTasks", []))

    assert deps(loop) == {"sweep-prepare"}
    assert deps("sweep-best") == {loop}
    assert "sweep-best" in deps("calibrate") and "sweep-best" in deps("allocate")
    assert "calibrate" in deps("allocate") and deps("evaluate") == {"allocate"}
    (cond,) = [name for name, t in tasks.items() if "triggerPolicy" in t]
    assert "evaluate-Output" in tasks[cond]["triggerPolicy"]["condition"]
    allocate_inputs = tasks["allocate"]["inputs"]["parameters"]
    assert allocate_inputs["settings"]["taskOutputParameter"] == {
        "outputParameterKey": "settings",
        "producerTask": "sweep-best",
    }
    for name in ("sweep-prepare", "sweep-best"):
        assert not tasks[name]["cachingOptions"].get("enableCache")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*non-Python base image.*")
@pytest.mark.filterwarnings("ignore:.*have no effect in the current local runner.*")
def test_sweep_pipeline_runs_in_the_local_runner(tmp_path):
    """The whole pipeline in kfp.local's SubprocessRunner: 2 parallel workers, 3 trials."""
    from kfp import local

    from pipelines.sweep import build

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(tmp_path / "root"),
        raise_on_error=True,
    )
    run = build(retries=False)(
        storage=storage,
        model=MODEL,
        study="local",
        target=TARGET,
        trials=3,
        workers=2,
        space=json.dumps({"iters": "20:22"}),
        calibration_samples=64,
        batch_size=32,
        validation_samples=64,
        evaluation_samples=64,
        report_every=10,
        tolerance=0.5,
        threads=1,
    )
    best = json.loads((Path(run.outputs["sweep"].path) / "best.json").read_text())
    manifest = json.loads((Path(run.outputs["sparse_model"].path) / "manifest.json").read_text())
    assert best["trials"]["total"] == 3
    assert manifest["score"] == best["score"] and manifest["exact"]
    assert {k: manifest["settings"][k] for k in best["params"]} == best["params"]
    study = optuna.load_study(study_name="local", storage=storage)
    assert sorted(t.number for t in study.trials) == [0, 1, 2]
