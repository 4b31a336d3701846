"""Model registry: registration, the champion/challenger rules, promote/rollback, and
concurrent registrations, against the embedded store and real MLflow servers."""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import uuid
from types import SimpleNamespace

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from services import HANG_GUARD_S  # noqa: E402

from fcpts.core import sparsify  # noqa: E402
from fcpts.demos import load_demo  # noqa: E402
from fcpts.errors import ServiceError, UserError  # noqa: E402
from fcpts.sparse_model import apply_allocation  # noqa: E402
from fcpts.tracking import (  # noqa: E402
    PipelineRun,
    RegistryLock,
    RetryPolicy,
    decide,
    load_model,
    promote,
    register,
    registry_hook,
    rollback,
)
from fcpts.tracking.connection import Store  # noqa: E402
from fcpts.tracking.names import LOCK_SUFFIX, M_CHAMPION_HISTORY  # noqa: E402
from fcpts.tracking.registry import greater_is_better  # noqa: E402

BACKENDS = ["embedded", "server-sqlite", "server-pg-s3"]
SERVERS = {"server-sqlite": "mlflow_sqlite_server", "server-pg-s3": "mlflow_pg_s3_server"}


@pytest.fixture(scope="module")
def embedded_uri(tmp_path_factory):
    # one store for the session, shared with the other MLflow test module: creating a SQLite
    # store takes seconds; tests use their own experiments and model names in it
    folder = tmp_path_factory.getbasetemp() / "fcpts-embedded-mlflow"
    folder.mkdir(exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(params=BACKENDS)
def tracking_uri(request, embedded_uri):
    if request.param == "embedded":
        return embedded_uri
    return request.getfixturevalue(SERVERS[request.param]).tracking_uri


@pytest.fixture(scope="module")
def sparse():
    """A real 70% sparse digits CNN (global magnitude allocation: fast)."""
    demo = load_demo("demo:digits-cnn")
    alloc = sparsify(demo.model, 0.7, method="global", score="magnitude", device="cpu")
    batches = demo.split("evaluation", 96, 48)
    return SimpleNamespace(
        demo=demo, model=apply_allocation(demo.model, alloc).eval(), batches=batches
    )


class Candidates:
    """Pipeline runs that share one logged sparse model (logging a model takes a second;
    the registry reads each run's own params, metrics and tags)."""

    def __init__(self, uri: str, sparse):
        self.uri = uri
        self.experiment = f"test-registry-{uuid.uuid4().hex[:8]}"
        base = PipelineRun.open(tracking_uri=uri, experiment=self.experiment)
        self.model_uri = base.log_model(sparse.model, sparse.batches[0], task=sparse.demo.task)
        base.finish()

    def run(
        self, value: float, achieved: float, *, metric: str = "top1", digest: str = "eval-v1"
    ) -> str:
        run = PipelineRun.open(tracking_uri=self.uri, experiment=self.experiment)
        run.log_params(
            {
                "target": round(achieved, 2),
                "allocator": "global",
                "metric": metric,
                "model_source": "demo:digits-cnn",
            }
        )
        run.log_metrics(
            {
                "evaluate/sparse": value,
                "evaluate/dense": 0.97,
                "allocate/achieved_sparsity": achieved,
            }
        )
        run.set_tags({"fcpts.model_uri": self.model_uri, "fcpts.evaluation_digest": digest})
        run.finish()
        return run.run_id


def _aliases(client, name) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def test_registry_rules(tracking_uri, sparse):
    """First version becomes champion; better beats it; worse and lower-sparsity stay
    challenger; the same run twice is one version; a rejected run is not registered;
    promote/rollback walk the history; models:/<name>@champion loads and matches."""
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name = f"digits-{uuid.uuid4().hex[:8]}"
    c = Candidates(tracking_uri, sparse)

    run1 = c.run(0.90, 0.7)
    r1 = register(run1, name, tracking_uri=tracking_uri, reasons=["delta within budget"])
    assert (r1.version, r1.created, r1.champion, r1.decision) == ("1", True, True, "champion")
    again = register(run1, name, tracking_uri=tracking_uri)
    assert (again.version, again.created, again.champion) == ("1", False, True)

    # through the hook that fcpts.steps.register calls with its RegistryRequest
    run2 = c.run(0.95, 0.7)
    request = SimpleNamespace(name=name, decision=SimpleNamespace(approved=True, reasons=["ok"]))
    r2 = SimpleNamespace(**registry_hook(run2, tracking_uri=tracking_uri)(request))
    assert (r2.version, r2.champion, r2.run_id) == ("2", True, run2)
    assert "beats champion version 1" in r2.reason

    r3 = register(c.run(0.93, 0.7), name, tracking_uri=tracking_uri)
    assert (r3.version, r3.champion, r3.decision) == ("3", False, "challenger")
    assert "does not beat champion version 2" in r3.reason
    assert _aliases(client, name) == {"champion": "2", "challenger": "3"}

    # a better metric at a lower sparsity
    r4 = register(c.run(0.99, 0.6), name, tracking_uri=tracking_uri)
    assert (r4.version, r4.champion) == ("4", False)
    assert "lower sparsity never displaces" in r4.reason

    # better and sparser
    r5 = register(c.run(0.96, 0.8), name, tracking_uri=tracking_uri)
    assert (r5.version, r5.champion) == ("5", True)

    r6 = register(c.run(0.99, 0.8, metric="cosine"), name, tracking_uri=tracking_uri)
    assert (r6.version, r6.champion) == ("6", False) and "not comparable" in r6.reason

    rejected = register(
        c.run(0.999, 0.9), name, tracking_uri=tracking_uri, approved=False, reasons=["too slow"]
    )
    assert (rejected.version, rejected.decision) == (None, "rejected")

    versions = {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}
    assert sorted(versions, key=int) == ["1", "2", "3", "4", "5", "6"]
    v5 = versions["5"]
    assert {
        k: v5.tags[k]
        for k in ("target", "achieved_sparsity", "metric", "metric_value", "allocator")
    } == {
        "target": "0.8",
        "achieved_sparsity": "0.8",
        "metric": "top1",
        "metric_value": "0.96",
        "allocator": "global",
    }
    assert v5.tags["source_run_id"] == v5.run_id
    assert (
        v5.tags["decision"] == "champion"
        and "beats champion version 2" in v5.tags["decision_reason"]
    )
    assert "beats champion version 2" in v5.description
    assert versions["2"].tags["decision"] == "former champion"
    assert _aliases(client, name) == {"champion": "5", "challenger": "6"}
    history = json.loads(client.get_registered_model(name).tags[M_CHAMPION_HISTORY])
    assert history == ["1", "2", "5"]

    # the champion loads back through MLflow and computes what the sparse model computes
    x = sparse.batches[1]["x"]
    with torch.no_grad():
        expected = sparse.model(x)
        with Store(tracking_uri).fluent():
            by_alias = mlflow.pytorch.load_model(f"models:/{name}@champion")
        assert torch.allclose(by_alias(x), expected, atol=1e-6)
        assert torch.allclose(load_model(name, tracking_uri=tracking_uri)(x), expected, atol=1e-6)

    back = rollback(name, tracking_uri=tracking_uri)
    assert (back.version, back.previous) == ("2", "5")
    assert client.get_model_version(name, "5").tags["decision"] == "rolled back"
    manual = promote(name, 3, tracking_uri=tracking_uri)
    assert (manual.version, manual.previous) == ("3", "2")
    assert _aliases(client, name)["champion"] == "3"
    assert rollback(name, tracking_uri=tracking_uri).version == "2"
    assert rollback(name, tracking_uri=tracking_uri).version == "1"
    with pytest.raises(UserError, match="no previous champion"):
        rollback(name, tracking_uri=tracking_uri)
    assert _aliases(client, name)["champion"] == "1"
    with pytest.raises(UserError, match="no version"):
        promote(name, 99, tracking_uri=tracking_uri)


# One interpreter imports fcpts once, then forks one process per registration (a fresh
# interpreter per process would spend seconds importing MLflow each); nothing has touched
# the network before the fork, so no connection is shared. The children wait on a pipe
# and are released together.
WORKER = r"""
import json, os, sys
from fcpts.tracking.registry import register

uri, name, *run_ids = sys.argv[1:]
go_r, go_w = os.pipe()
out_r, out_w = os.pipe()
children = []
for run_id in run_ids:
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.read(go_r, 1)
        try:
            r = register(run_id, name, tracking_uri=uri)
            line = {"pid": os.getpid(), "run": run_id, "version": r.version, "created": r.created}
        except BaseException as exc:
            line = {"pid": os.getpid(), "run": run_id, "error": repr(exc)}
        os.write(out_w, (json.dumps(line) + "\n").encode())  # < PIPE_BUF: atomic
        os._exit(0)
    children.append(pid)
os.close(out_w)
print("ready", flush=True)
sys.stdin.readline()
os.write(go_w, b"g" * len(children))
for pid in children:
    os.waitpid(pid, 0)
with os.fdopen(out_r) as f:
    print(f.read(), end="", flush=True)
"""


@pytest.mark.parametrize("server", list(SERVERS.values()))
def test_concurrent_registrations_leave_one_champion(server, request, sparse):
    """Four processes register at the same instant to one model on a real server (three
    runs, the best one twice): three versions, one champion, the best one."""
    uri = request.getfixturevalue(server).tracking_uri
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"digits-race-{uuid.uuid4().hex[:8]}"
    c = Candidates(uri, sparse)
    runs = [c.run(0.91, 0.7), c.run(0.97, 0.7), c.run(0.94, 0.7)]
    jobs = [*runs, runs[1]]
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, uri, name, *jobs],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        ready = sel.select(HANG_GUARD_S) and proc.stdout.readline().strip() == "ready"
        sel.close()
        assert ready, (
            proc.stderr.read() if proc.poll() is not None else f"no answer in {HANG_GUARD_S:.0f} s"
        )
        out, err = proc.communicate("go\n", timeout=HANG_GUARD_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-3000:]
    results = [json.loads(line) for line in out.splitlines() if line.strip()]
    assert len(results) == 4 and len({r["pid"] for r in results}) == 4
    assert not [r for r in results if "error" in r], results

    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 3, [(v.version, v.tags.get("source_run_id")) for v in versions]
    champion = _aliases(client, name)["champion"]
    # the alias is one pointer; the decisions recorded on the versions agree with it
    champions = [v for v in versions if v.tags.get("decision") == "champion"]
    assert [str(v.version) for v in champions] == [champion]
    assert champions[0].tags["source_run_id"] == runs[1]
    assert sum(r["created"] for r in results) == 3
    assert len({r["version"] for r in results if r["run"] == runs[1]}) == 1
    assert all(v.tags.get("decision") for v in versions)
    history = json.loads(client.get_registered_model(name).tags[M_CHAMPION_HISTORY])
    assert history[-1] == champion
    assert not client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_decide_rules():
    base = {
        "metric": "top1",
        "metric_value": "0.9",
        "achieved_sparsity": "0.7",
        "greater_is_better": "true",
    }
    assert decide(base, None)[0]
    assert not decide(dict(base), base)[0]  # a tie does not displace
    assert decide(dict(base, metric_value="0.91"), base)[0]
    assert decide(dict(base, metric_value="0.91", achieved_sparsity="0.75"), base)[0]
    assert not decide(dict(base, metric_value="0.99", achieved_sparsity="0.69"), base)[0]
    # across targets the sparser approved version wins, even with a lower metric
    sparser, reason = decide(dict(base, metric_value="0.85", achieved_sparsity="0.75"), base)
    assert sparser and "sparser approved version wins" in reason
    # at the same sparsity a worse one does not
    assert not decide(dict(base, metric_value="0.85"), base)[0]
    # another source model is not compared
    other = decide(
        dict(base, metric_value="0.99", model_digest="sha256:a"),
        dict(base, model_digest="sha256:b"),
    )
    assert not other[0] and "another source model" in other[1]
    narrower = decide(
        dict(base, achieved_sparsity="0.9", prunable="100"), dict(base, prunable="900")
    )
    assert not narrower[0] and "another set of prunable weights" in narrower[1]
    assert not decide(dict(base, metric="cosine", metric_value="0.99"), base)[0]
    assert not decide(
        dict(base, metric_value="0.99", evaluation_digest="a"), dict(base, evaluation_digest="b")
    )[0]
    mse = {
        "metric": "output_mse",
        "metric_value": "0.2",
        "achieved_sparsity": "0.7",
        "greater_is_better": "false",
    }
    assert not greater_is_better("output_mse") and greater_is_better("cosine")
    assert decide(dict(mse, metric_value="0.1"), mse)[0]
    assert not decide(dict(mse, metric_value="0.3"), mse)[0]


def test_targets_share_one_registered_model(embedded_uri, sparse, tmp_path):
    """Two registrations at 0.5 and 0.7 with the default name, through the register step:
    one registered model <model>-<method>, both versions, exactly one champion (the sparser
    one), and a description that reads."""
    from fcpts.steps import register as register_step

    client = mlflow.MlflowClient(tracking_uri=embedded_uri, registry_uri=embedded_uri)
    c = Candidates(embedded_uri, sparse)
    method = f"m{uuid.uuid4().hex[:8]}"  # a registered model of its own in the shared store
    prunable = 1000
    records, runs = [], []
    for target, value in ((0.5, 0.96), (0.7, 0.94)):
        runs.append(c.run(value, target))
        folder = tmp_path / f"sparse-{target}"
        folder.mkdir()
        manifest = {"target": target, "method": method, "sources": {"model": "demo:digits-cnn"}}
        (folder / "manifest.json").write_text(json.dumps(manifest))
        metrics = {"metric": "top1", "dense": 0.97, "sparse": value, "prunable": prunable}
        metrics["zeros"] = round(target * prunable)
        hook = registry_hook(runs[-1], tracking_uri=embedded_uri)
        done = register_step(
            metrics, folder, tmp_path / f"d-{target}", tolerance=0.05, registry=hook
        )
        assert done.decision.approved, done.decision.reasons
        records.append(done.record)
    name = f"digits-cnn-{method}"
    assert [r["name"] for r in records] == [name, name]
    versions = {
        v.tags["source_run_id"]: v for v in client.search_model_versions(f"name = '{name}'")
    }
    assert set(versions) == set(runs) and len(versions) == 2
    aliases = _aliases(client, name)
    assert aliases == {"champion": str(versions[runs[1]].version)}
    assert [r["registration"]["decision"] for r in records] == ["champion", "champion"]
    decisions = sorted(
        client.get_model_version(name, v.version).tags["decision"] for v in versions.values()
    )
    assert decisions == ["champion", "former champion"]
    description = client.get_model_version(name, aliases["champion"]).description
    assert description.startswith("digits-cnn pruned by global to 70% sparsity (0.700000 of its")
    assert "top1 0.94 (dense 0.97)" in description


def test_lock_excludes_then_breaks_when_stale(embedded_uri):
    store = Store(embedded_uri)
    name = f"lock-{uuid.uuid4().hex[:8]}"
    with RegistryLock(store, name, timeout=HANG_GUARD_S) as held:
        with pytest.raises(ServiceError, match="could not take the registry lock"):
            RegistryLock(store, name, timeout=0.3).acquire()
        # everything is stale to it
        breaker = RegistryLock(store, name, timeout=HANG_GUARD_S, ttl=0.0)
        breaker.acquire()
        with pytest.raises(ServiceError, match="lost the registry lock"):
            held.verify()
        breaker.release()
    assert not store.client.search_registered_models(f"name = '{name}{LOCK_SUFFIX}'")


def test_unreachable_registry_is_a_service_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ServiceError, match=f"127.0.0.1:{port}"):
        register(
            "0" * 32,
            "m",
            tracking_uri=f"http://127.0.0.1:{port}",
            retry=RetryPolicy(attempts=2, backoff=0.05),
        )


def test_summary_links_the_run_and_version_and_says_how_to_reproduce():
    """The summary `fcpts run` and `fcpts register` print: the MLflow run and registered
    version (UI links for an http store, the ids otherwise), the command that reproduces
    the run (it parses back to the same settings), the emptiest layers beside the
    fullest, and a plain warning when the sparse model is slower than dense."""
    import shlex

    from fcpts import report
    from fcpts.cli import build_parser
    from fcpts.steps.reproduce import reproduce_command

    layers = [
        {"name": "a", "numel": 100, "zeros": 90, "sparsity": 0.9},
        {"name": "b", "numel": 100, "zeros": 10, "sparsity": 0.1},
        {"name": "c", "numel": 100, "zeros": 50, "sparsity": 0.5},
    ]
    manifest = {
        "target": 0.5,
        "achieved_sparsity": 0.5,
        "zeros": 150,
        "prunable": 300,
        "layers": layers,
        "method": "fcpts",
        "score": "wanda",
        "seed": 3,
        "sources": {"model": "demo:minilm", "data": None},
        "settings": {"iters": 50, "joint": False},
        "selection": {"keep_dense": ["pooler.dense"], "bounds": {"classifier.*": [0, 0.5]}},
        "calibration": {"samples": 32},
    }
    cmd = reproduce_command(manifest, {"evaluation": {"samples": 100}}, {"tolerance": 0.02})
    words = shlex.split(cmd)
    assert words[:2] == ["fcpts", "run"] and "--name" not in words  # the default name
    args = build_parser().parse_args(words[1:])
    assert (args.model, args.target, args.method, args.score) == (
        "demo:minilm",
        0.5,
        "fcpts",
        "wanda",
    )
    assert (args.seed, args.iters, args.joint, args.tolerance) == (3, 50, False, 0.02)
    assert args.calibration_samples == 32 and args.evaluation_samples == 100
    assert args.keep_dense == ["pooler.dense"] and args.bounds == ["classifier.*=0:0.5"]
    named = reproduce_command(manifest, {}, {"tolerance": 0.02, "name": "serving"})
    assert build_parser().parse_args(shlex.split(named)[1:]).name == "serving"

    reg = {
        "registry": "mlflow",
        "tracking_uri": "http://127.0.0.1:5000",
        "run_id": "abc123",
        "name": "minilm fcpts",
        "version": "2",
        "champion": True,
        "created": True,
        "decision": "champion",
        "reason": "first champion",
        "model_uri": "models:/minilm fcpts/2",
    }
    decision = {"approved": True, "reasons": ["ok"], "tolerance": 0.02, "command": cmd}
    text = report.summary(manifest=manifest, decision=dict(decision, registration=reg))
    assert "http://127.0.0.1:5000/#/runs/abc123" in text
    assert (
        "minilm fcpts version 2 (a new version), champion: "
        "http://127.0.0.1:5000/#/models/minilm%20fcpts/versions/2" in text
    )
    assert cmd in text.splitlines()[-1]
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert rows["fullest"].endswith("b 0.100, c 0.500, a 0.900  (kept densest)")
    assert rows["emptiest"].endswith("a 0.900, c 0.500, b 0.100  (pruned hardest)")
    local = report.summary(
        decision=dict(decision, registration=dict(reg, tracking_uri="sqlite:///m.db"))
    )
    assert "run abc123 in sqlite:///m.db" in local and "models:/minilm fcpts/2" in local

    from fcpts.links import tracking_line

    record = {"pipeline_run_id": "p-1", "experiment": "fcpts", "tracking_uri": "sqlite:///m.db"}
    assert "pipeline run p-1 in experiment fcpts" in tracking_line(record)

    assert report.slower_warning({"dense_ms": 2.0, "sparse_ms": 1.0}) is None
    assert "within timing noise" in report.slower_warning({"dense_ms": 1.0, "sparse_ms": 1.03})
    slower = report.slower_warning({"dense_ms": 1.0, "sparse_ms": 1.5})
    assert slower.startswith("WARNING: the sparse model is SLOWER than dense: 1.50x")
