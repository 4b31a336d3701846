"""Republishing an S3 output never loses the earlier one: a real subprocess republishing
to a real moto server over HTTP is SIGKILLed before each of its S3 calls in turn, and
after every kill the prefix holds a whole output (the earlier one until the new index was
switched in). Later publishes remove what the killed ones left, in S3 and in the cache;
malformed indexes are refused with one line naming the index."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from fcpts.errors import UserError
from fcpts.storage import local, s3
from fcpts.storage.outputs import (
    INDEX_NAME,
    fetch_output,
    outputs_cache,
    publish,
    read_index,
    staged_output,
)

OLD = {"model.safetensors": os.urandom(20_000), "manifest.json": b'{"v": "old"}'}
NEW = {"model.safetensors": os.urandom(20_000), "report/notes.txt": b"new"}

KILLER = """
import os, signal, sys
from pathlib import Path
from fcpts.storage import s3
from fcpts.storage.outputs import staged_remote

uri, kill_at = sys.argv[1], int(sys.argv[2])
client = s3.make_client()
calls = []

def before(params, event_name, **kwargs):
    calls.append(1)
    if len(calls) == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    # announced before it is sent, so the parent knows what may have reached the server
    print(event_name.rsplit(".", 1)[-1], params.get("Key", ""), flush=True)

client.meta.events.register("before-parameter-build.s3.*", before)
with staged_remote(uri, client=client) as stage:
    for rel, data in {"model.safetensors": Path(sys.argv[3]).read_bytes(),
                      "report/notes.txt": b"new"}.items():
        (stage.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (stage.folder / rel).write_bytes(data)
print("calls", len(calls), flush=True)
"""


@pytest.fixture
def bucket(aws_env):
    name = f"rep-{uuid.uuid4().hex[:12]}"
    aws_env.client().create_bucket(Bucket=name)
    return name


def _write(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _keys(moto, bucket: str) -> list[str]:
    resp = moto.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _republish(script: Path, uri: str, kill_at: int, model: Path) -> tuple[int, list[str]]:
    proc = subprocess.run(
        [sys.executable, str(script), uri, str(kill_at), str(model)],
        capture_output=True,
        text=True,
        timeout=600,  # guards a hang only
    )
    return proc.returncode, proc.stdout.splitlines()


def _staging_folders() -> list[str]:
    return sorted(p.name for p in outputs_cache().glob(f".*{local.TMP_MARKER}*"))


def test_killed_republish_keeps_a_whole_output(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/runs/sparse"
    script = tmp_path / "republish.py"
    script.write_text(KILLER)
    model = tmp_path / "new-model.bin"
    model.write_bytes(NEW["model.safetensors"])

    with staged_output(uri) as folder:
        _write(folder, OLD)
    code, lines = _republish(script, uri, 0, model)  # no kill: count the calls
    assert code == 0 and lines[-1].startswith("calls "), lines
    total = int(lines[-1].split()[1])
    assert _tree(fetch_output(uri, tmp_path / "check")) == NEW
    assert total > 15  # a republish makes many calls; each is a kill point

    outcomes = []
    for kill_at in range(1, total + 1):
        with staged_output(uri) as folder:  # the earlier output, whole
            _write(folder, OLD)
        code, lines = _republish(script, uri, kill_at, model)
        assert code == -signal.SIGKILL, (kill_at, lines)
        # calls announced before the kill were sent; the last one may have reached S3
        switched = any(
            line.split()[:2] == ["CopyObject", f"runs/sparse/{INDEX_NAME}"] for line in lines
        )
        got = _tree(fetch_output(uri, tmp_path / f"got-{kill_at}"))
        assert got == (NEW if switched else OLD), (kill_at, "; ".join(lines))
        outcomes.append(switched)
    assert not outcomes[0] and outcomes[-1]  # kills on both sides of the switch

    # what the killed runs left: a staging folder in the cache, staged objects in S3
    assert _staging_folders()
    assert any(s3.STAGING_MARKER in k for k in _keys(aws_env, bucket))
    with staged_output(uri) as folder:  # a later run removes the cache's leftovers
        _write(folder, OLD)
    assert _staging_folders() == []
    final = tmp_path / "final"
    _write(final, NEW)
    publish(final, uri, stale_after=0)  # and the staged objects once they are stale
    assert _keys(aws_env, bucket) == sorted(f"runs/sparse/{k}" for k in [*NEW, INDEX_NAME])
    assert _tree(fetch_output(uri, tmp_path / "last")) == NEW


def test_staged_objects_of_a_live_publish_are_kept(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/out"
    with staged_output(uri) as folder:
        _write(folder, OLD)
    live = f"out/{s3.STAGING_MARKER}{uuid.uuid4().hex}/model.safetensors"
    aws_env.client().put_object(Bucket=bucket, Key=live, Body=b"being uploaded")
    with staged_output(uri) as folder:  # a day has not passed: not taken for litter
        _write(folder, NEW)
    assert live in _keys(aws_env, bucket)
    assert _tree(fetch_output(uri, tmp_path / "got")) == NEW


def _put_index(moto, bucket: str, prefix: str, index) -> str:
    body = index if isinstance(index, bytes) else json.dumps(index).encode()
    moto.client().put_object(Bucket=bucket, Key=f"{prefix}/{INDEX_NAME}", Body=body)
    return f"s3://{bucket}/{prefix}"


SHA = "0" * 64


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ({"format": 1, "files": {"m.bin": {"size": 3}}}, "the entry of 'm.bin' has no sha256"),
        ({"format": 1, "files": {"m.bin": {"sha256": SHA}}}, "'m.bin' has no size"),
        ({"format": 1, "files": {"m.bin": "x"}}, "the entry of 'm.bin' is not an object"),
        (
            {
                "format": 1,
                "files": {
                    "manifest.json": {"sha256": SHA, "size": 1},
                    "manifest.json/x": {"sha256": SHA, "size": 1},
                },
            },
            "'manifest.json' is listed as a file and as the folder of 'manifest.json/x'",
        ),
        ({"format": 1, "files": []}, "no files"),
        ({"format": 7, "files": {}}, "no format 1"),
        (b"{not json", "not JSON"),
        (
            {"format": 1, "files": {"m.bin": {"sha256": SHA, "size": 1, "object": "../x"}}},
            "leaves the folder",
        ),
    ],
)
def test_malformed_indexes_are_refused(aws_env, bucket, tmp_path, index, match):
    uri = _put_index(aws_env, bucket, "bad", index)
    for read in (lambda: read_index(uri), lambda: fetch_output(uri, tmp_path / "got")):
        with pytest.raises(UserError, match=match) as info:
            read()
        assert f"s3://{bucket}/bad/{INDEX_NAME}" in str(info.value)
        assert "run the step that writes this output again" in str(info.value)
    assert not (tmp_path / "got").exists()
