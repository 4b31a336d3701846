"""staged_output / fetch_output: outputs whole or absent, locally and in S3 (moto)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import services

from fcpts.errors import FcptsError, ServiceError, UserError
from fcpts.storage import s3
from fcpts.storage.outputs import INDEX_NAME, fetch_output, read_index, staged_output


class Boom(Exception):
    pass


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        p = folder / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


FILES = {
    "model.safetensors": os.urandom(70_000),
    "manifest.json": b'{"target": 0.7}',
    "report/chart.png": os.urandom(3000),
}


# ------------------------------------------------------------------------------ local


def test_local_output_appears_only_on_success(tmp_path):
    dest = tmp_path / "runs" / "sparse"
    with staged_output(dest) as folder:
        assert folder.parent == dest.parent and not dest.exists()
        _write(folder, FILES)
    assert _tree(dest) == FILES
    assert [p.name for p in dest.parent.iterdir()] == ["sparse"]
    assert fetch_output(dest) == dest

    # a failed rewrite leaves the earlier output untouched and no temporary folder
    with pytest.raises(Boom), staged_output(dest) as folder:
        _write(folder, {"model.safetensors": b"half"})
        raise Boom
    assert _tree(dest) == FILES
    assert [p.name for p in dest.parent.iterdir()] == ["sparse"]

    # a successful rewrite replaces it whole
    with staged_output(dest) as folder:
        _write(folder, {"other.txt": b"new"})
    assert _tree(dest) == {"other.txt": b"new"}


def test_local_output_of_a_killed_process_is_absent(tmp_path):
    dest = tmp_path / "out"
    code = (
        "import os, signal, sys\n"
        "from fcpts.storage.outputs import staged_output\n"
        "with staged_output(sys.argv[1]) as d:\n"
        "    (d / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(dest)], timeout=services.HANG_GUARD_S)
    assert proc.returncode == -signal.SIGKILL
    assert not dest.exists()
    with pytest.raises(UserError, match=r"output .*out does not exist: run the step"):
        fetch_output(dest)


def test_local_output_refuses_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file"), staged_output(tmp_path / "f"):
        pass


# --------------------------------------------------------------------------------- S3


@pytest.fixture
def bucket(aws_env):
    name = f"out-{uuid.uuid4().hex[:12]}"
    aws_env.client().create_bucket(Bucket=name)
    return name


def _keys(moto, bucket: str) -> list[str]:
    resp = moto.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_s3_output_round_trip(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/runs/7/sparse"
    with staged_output(uri) as folder:
        _write(folder, FILES)
    assert _keys(aws_env, bucket) == sorted(
        [f"runs/7/sparse/{rel}" for rel in FILES] + [f"runs/7/sparse/{INDEX_NAME}"]
    )
    assert not folder.exists()  # the local staging folder is gone
    index = read_index(uri)
    assert set(index["files"]) == set(FILES)
    assert index["files"]["manifest.json"]["size"] == len(FILES["manifest.json"])

    got = fetch_output(uri + "/", tmp_path / "local")
    assert got == tmp_path / "local" and _tree(got) == FILES
    cached = fetch_output(uri)
    assert _tree(cached) == FILES and fetch_output(uri) == cached
    assert [p.name for p in tmp_path.iterdir() if "fcpts-tmp" in p.name] == []


def test_s3_output_failing_step_publishes_nothing(aws_env, bucket):
    uri = f"s3://{bucket}/runs/8/sparse"
    with pytest.raises(Boom), staged_output(uri) as folder:
        _write(folder, FILES)
        raise Boom
    assert _keys(aws_env, bucket) == []
    with pytest.raises(UserError, match=rf"{uri} is not a complete fcpts output"):
        fetch_output(uri)


def test_s3_output_interrupted_rewrite_keeps_the_earlier_output(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/sparse"
    with staged_output(uri) as folder:
        _write(folder, FILES)
    client = s3.make_client()
    puts = []

    def fail_second_put(**kwargs):
        puts.append(1)
        if len(puts) == 2:
            raise ConnectionResetError("simulated network failure")

    client.meta.events.register("before-call.s3.PutObject", fail_second_put)
    with pytest.raises(ServiceError), staged_output(uri, client=client) as folder:
        _write(folder, {"model.safetensors": b"new", "manifest.json": b"{}"})
    # the earlier output stays whole and readable; the half-rewritten one is not seen
    assert _tree(fetch_output(uri, tmp_path / "got")) == FILES
    assert not any(s3.TMP_MARKER in k for k in _keys(aws_env, bucket))


def test_s3_output_corrupt_object_is_detected(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/sparse"
    with staged_output(uri) as folder:
        _write(folder, FILES)
    aws_env.client().put_object(Bucket=bucket, Key="sparse/manifest.json", Body=b"tampered")
    with pytest.raises(FcptsError, match=rf"sha256 mismatch for {uri}/manifest.json"):
        fetch_output(uri, tmp_path / "local")
    assert not (tmp_path / "local").exists()


def test_s3_output_index_escaping_paths_are_refused(aws_env, bucket):
    index = {"format": 1, "files": {"../../etc/passwd": {"sha256": "0" * 64, "size": 1}}}
    aws_env.client().put_object(
        Bucket=bucket, Key=f"x/{INDEX_NAME}", Body=json.dumps(index).encode()
    )
    with pytest.raises(UserError, match="leaves the folder"):
        fetch_output(f"s3://{bucket}/x")


def test_s3_output_errors(aws_env, monkeypatch):
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        with staged_output("s3://no-such-bucket/out"):
            raise AssertionError("the step must not run")
    with pytest.raises(UserError, match="s3://no-such-bucket/out.*does not exist"):
        fetch_output("s3://no-such-bucket/out")
    endpoint = f"http://127.0.0.1:{services.free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(ServiceError, match=rf"s3://bkt/out.*{endpoint}"):
        with staged_output("s3://bkt/out"):
            raise AssertionError("the step must not run")
