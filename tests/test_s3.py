"""fcpts.storage.s3 against a real moto S3 server over HTTP (no mocks of boto3)."""

from __future__ import annotations

import hashlib
import json
import os
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import services

from fcpts.errors import FcptsError, ServiceError, UserError
from fcpts.storage import s3

MB = 1024 * 1024


@pytest.fixture
def bucket(aws_env):
    name = f"test-{uuid.uuid4().hex[:12]}"
    aws_env.client().create_bucket(Bucket=name)
    return name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _keys(moto, bucket: str) -> list[str]:
    resp = moto.client().list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _make_folder(root: Path) -> dict[str, bytes]:
    files = {
        "config.json": json.dumps({"sparsity": 0.5}).encode(),
        "weights/layer0.bin": os.urandom(100_000),
        "weights/deeper/layer1.bin": os.urandom(3000),
        "empty.txt": b"",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return files


# ----------------------------------------------------------------------------- parsing


def test_parse_s3_uri():
    assert s3.parse_s3_uri("s3://bucket/a/b.bin") == ("bucket", "a/b.bin")
    assert s3.parse_s3_uri("s3://bucket/dir/") == ("bucket", "dir/")
    assert s3.parse_s3_uri("s3://bucket") == ("bucket", "")
    assert s3.parse_s3_uri("s3://bucket/") == ("bucket", "")
    for bad in ("bucket/key", "s3:/bucket/key", "s3://", "s3:///key", "http://b/k", "s3://a/k"):
        with pytest.raises(UserError, match="s3://"):
            s3.parse_s3_uri(bad)


# -------------------------------------------------------------------------- round trips


def test_folder_round_trip(aws_env, bucket, tmp_path):
    src = tmp_path / "model"
    files = _make_folder(src)

    written = s3.upload(src, f"s3://{bucket}/runs/1/model")

    assert written == {f"runs/1/model/{rel}": _sha(data) for rel, data in files.items()}
    assert _keys(aws_env, bucket) == sorted(written)  # no temporary keys left
    head = aws_env.client().head_object(Bucket=bucket, Key="runs/1/model/config.json")
    assert head["Metadata"]["sha256"] == _sha(files["config.json"])

    for uri in (f"s3://{bucket}/runs/1/model", f"s3://{bucket}/runs/1/model/"):
        dest = tmp_path / f"dest-{uuid.uuid4().hex[:6]}"
        got = s3.download(uri, dest)
        assert got == dest / "model"
        assert _tree(got) == files
        assert sorted(p.name for p in dest.iterdir()) == ["model"]  # no temporary leftovers

    # Downloading again replaces the folder.
    (dest / "model" / "stale.txt").write_text("old")
    assert _tree(s3.download(f"s3://{bucket}/runs/1/model", dest)) == files


def test_single_file_round_trip(aws_env, bucket, tmp_path):
    data = os.urandom(50_000)
    src = tmp_path / "weights.safetensors"
    src.write_bytes(data)

    assert s3.upload(src, f"s3://{bucket}/m/w.st") == {"m/w.st": _sha(data)}
    assert s3.upload(src, f"s3://{bucket}/m/") == {"m/weights.safetensors": _sha(data)}
    assert _keys(aws_env, bucket) == ["m/w.st", "m/weights.safetensors"]

    dest = tmp_path / "dest"
    got = s3.download(f"s3://{bucket}/m/w.st", dest)
    assert got == dest / "w.st"
    assert got.read_bytes() == data
    assert [p.name for p in dest.iterdir()] == ["w.st"]

    assert s3.verify(f"s3://{bucket}/m/w.st", _sha(data)) == _sha(data)
    with pytest.raises(FcptsError, match="sha256 mismatch"):
        s3.verify(f"s3://{bucket}/m/w.st", "0" * 64)


def test_large_file_goes_through_multipart(aws_env, bucket, tmp_path):
    data = os.urandom(20 * MB)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    client = s3.make_client()
    calls: dict[str, int] = {}

    def count(event_name, **kwargs):
        op = event_name.rsplit(".", 1)[-1]
        calls[op] = calls.get(op, 0) + 1

    client.meta.events.register("before-call.s3", count)
    sizes = {"multipart_threshold": 5 * MB, "multipart_chunksize": 5 * MB}

    written = s3.upload(src, f"s3://{bucket}/big.bin", client=client, **sizes)

    assert written == {"big.bin": _sha(data)}
    assert calls.get("UploadPart") == 4  # the temporary object, in 4 parts
    assert calls.get("UploadPartCopy") == 4  # the server-side copy to the final key
    head = aws_env.client().head_object(Bucket=bucket, Key="big.bin")
    assert head["ETag"].endswith('-4"')
    assert head["Metadata"]["sha256"] == _sha(data)
    assert _keys(aws_env, bucket) == ["big.bin"]

    calls.clear()
    got = s3.download(f"s3://{bucket}/big.bin", tmp_path / "dest", client=client, **sizes)
    assert calls.get("GetObject", 0) >= 4  # ranged GETs
    assert hashlib.sha256(got.read_bytes()).hexdigest() == _sha(data)


def test_download_rejects_corrupt_object(aws_env, bucket, tmp_path):
    client = aws_env.client()
    client.put_object(Bucket=bucket, Key="m.bin", Body=b"data", Metadata={"sha256": "0" * 64})
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "m.bin").write_bytes(b"previous")

    with pytest.raises(FcptsError, match=rf"sha256 mismatch for s3://{bucket}/m.bin"):
        s3.download(f"s3://{bucket}/m.bin", dest)

    assert [p.name for p in dest.iterdir()] == ["m.bin"]  # no temporary file left
    assert (dest / "m.bin").read_bytes() == b"previous"  # the old file is untouched


def test_failed_download_leaves_nothing_under_final_name(aws_env, bucket, tmp_path):
    data = os.urandom(12 * MB)
    aws_env.client().put_object(Bucket=bucket, Key="big.bin", Body=data)
    client = s3.make_client()
    gets = []

    def fail_after_first_get(**kwargs):
        gets.append(1)
        if len(gets) > 1:  # s3transfer retries a broken GET: keep failing
            raise ConnectionResetError("simulated network failure")

    client.meta.events.register("before-call.s3.GetObject", fail_after_first_get)
    dest = tmp_path / "dest"
    with pytest.raises(ServiceError, match="lost the connection.*simulated network failure"):
        s3.download(
            f"s3://{bucket}/big.bin",
            dest,
            client=client,
            multipart_threshold=5 * MB,
            multipart_chunksize=5 * MB,
        )
    assert list(dest.iterdir()) == []


# -------------------------------------------------------------------- atomic uploads


def test_failed_multipart_upload_leaves_old_object_and_no_temp_keys(aws_env, bucket, tmp_path):
    moto_client = aws_env.client()
    moto_client.put_object(Bucket=bucket, Key="model.bin", Body=b"version 1")
    src = tmp_path / "model.bin"
    src.write_bytes(os.urandom(12 * MB))
    client = s3.make_client()
    parts = []

    def fail_second_part(**kwargs):
        parts.append(1)
        if len(parts) == 2:
            raise ConnectionResetError("simulated network failure")

    client.meta.events.register("before-call.s3.UploadPart", fail_second_part)

    with pytest.raises(ServiceError, match="lost the connection.*simulated network failure"):
        s3.upload(
            src,
            f"s3://{bucket}/model.bin",
            client=client,
            multipart_threshold=5 * MB,
            multipart_chunksize=5 * MB,
        )

    assert _keys(aws_env, bucket) == ["model.bin"]
    assert moto_client.get_object(Bucket=bucket, Key="model.bin")["Body"].read() == b"version 1"
    assert moto_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_file_changing_during_upload_is_not_published(aws_env, bucket, tmp_path):
    src = tmp_path / "model.bin"
    src.write_bytes(b"a" * 1000)
    client = s3.make_client()

    def grow_file(**kwargs):
        with open(src, "ab") as f:
            f.write(b"more")

    client.meta.events.register("after-call.s3.PutObject", grow_file)

    with pytest.raises(FcptsError, match="changed while it was uploaded"):
        s3.upload(src, f"s3://{bucket}/model.bin", client=client)
    assert _keys(aws_env, bucket) == []


def test_file_vanishing_before_upload_is_not_published(aws_env, bucket, tmp_path, monkeypatch):
    src = tmp_path / "model.bin"
    src.write_bytes(b"a" * 1000)
    real_sha256_file = s3.sha256_file

    def hash_then_delete(path):
        digest = real_sha256_file(path)
        os.unlink(path)
        return digest

    monkeypatch.setattr(s3, "sha256_file", hash_then_delete)
    with pytest.raises(FcptsError, match=f"s3://{bucket}/model.bin"):
        s3.upload(src, f"s3://{bucket}/model.bin")
    assert _keys(aws_env, bucket) == []


# ------------------------------------------------------------------------------ errors


def test_missing_bucket(aws_env, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        s3.download("s3://no-such-bucket/model/f.bin", tmp_path / "dest")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        s3.download("s3://no-such-bucket/model/", tmp_path / "dest")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        s3.upload(tmp_path / "f.bin", "s3://no-such-bucket/model/f.bin")
    with pytest.raises(UserError, match="bucket 'no-such-bucket' does not exist"):
        s3.verify("s3://no-such-bucket/model/f.bin", "0" * 64)


def test_missing_key(aws_env, bucket, tmp_path):
    aws_env.client().put_object(Bucket=bucket, Key="other/f.bin", Body=b"x")
    with pytest.raises(UserError, match=rf"s3://{bucket}/model/f.bin.*no object has this key"):
        s3.download(f"s3://{bucket}/model/f.bin", tmp_path / "dest")
    with pytest.raises(UserError, match="no objects under this prefix"):
        s3.download(f"s3://{bucket}/model/", tmp_path / "dest")
    with pytest.raises(UserError, match=rf"s3://{bucket}/model/f.bin: no such object"):
        s3.verify(f"s3://{bucket}/model/f.bin", "0" * 64)
    with pytest.raises(UserError, match="no such file or folder"):
        s3.upload(tmp_path / "missing", f"s3://{bucket}/x")


def test_wrong_credentials(tmp_path):
    """moto checks credentials only with IAM auth switched on (POST /moto-api/reset-auth,
    the server-mode INITIAL_NO_AUTH_ACTION_COUNT); a server of its own, so the shared one
    stays open."""
    with services.start_moto(tmp_path) as moto:
        iam = moto.client("iam")
        iam.create_user(UserName="fcpts")
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_user_policy(UserName="fcpts", PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="fcpts")["AccessKey"]
        moto.client().create_bucket(Bucket="private")
        moto.client().put_object(Bucket="private", Key="m.bin", Body=b"data")
        req = urllib.request.Request(
            f"{moto.endpoint_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},  # not a form: moto reads the raw body
        )
        urllib.request.urlopen(req, timeout=services.HANG_GUARD_S).close()

        def client(key_id, secret):
            return s3.make_client(
                endpoint_url=moto.endpoint_url,
                region_name="us-east-1",
                aws_access_key_id=key_id,
                aws_secret_access_key=secret,
            )

        good = client(key["AccessKeyId"], key["SecretAccessKey"])
        assert s3.download("s3://private/m.bin", tmp_path / "d", client=good).read_bytes() == (
            b"data"
        )

        bad_key = client("AKIAWRONGWRONGWRONG0", key["SecretAccessKey"])
        bad_secret = client(key["AccessKeyId"], "wrong-secret")
        (tmp_path / "f.bin").write_bytes(b"x")
        for op in (
            lambda c: s3.download("s3://private/m.bin", tmp_path / "d", client=c),
            lambda c: s3.download("s3://private/", tmp_path / "d", client=c),
            lambda c: s3.upload(tmp_path / "f.bin", "s3://private/f.bin", client=c),
        ):
            with pytest.raises(UserError, match="does not know the access key.*AWS_ACCESS_KEY_ID"):
                op(bad_key)
            with pytest.raises(UserError, match="secret key does not match.*AWS_SECRET_ACCESS_KEY"):
                op(bad_secret)


def test_unreachable_endpoint(aws_env, monkeypatch, tmp_path):
    endpoint = f"http://127.0.0.1:{services.free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    (tmp_path / "f.bin").write_bytes(b"x")
    for op in (
        lambda: s3.download("s3://bucket/model.bin", tmp_path / "dest"),
        lambda: s3.upload(tmp_path / "f.bin", "s3://bucket/model.bin"),
    ):
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as info:
            op()
        assert time.monotonic() - t0 < 15
        msg = str(info.value)
        assert "s3://bucket/model.bin" in msg
        assert endpoint in msg
        assert "AWS_ENDPOINT_URL_S3" in msg
