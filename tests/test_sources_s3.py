"""S3 model, weights and data sources against a real moto S3 server over HTTP."""

from __future__ import annotations

import json
import shutil
import urllib.request
import uuid
from pathlib import Path

import pytest
import services
import torch

from fcpts.errors import ServiceError, UserError
from fcpts.sources import Sources, load_weights, resolve_data, resolve_model
from fcpts.storage import cache, s3


@pytest.fixture
def bucket(aws_env):
    name = f"src-{uuid.uuid4().hex[:12]}"
    aws_env.client().create_bucket(Bucket=name)
    return name


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in (root / "s3").glob("*/*") if p.is_dir())


def _tiny_bert(folder: Path) -> Path:
    """A two-layer BERT with the MiniLM demo's tokenizer: a Hugging Face folder of ~4 MB."""
    from transformers import BertConfig, BertModel

    from fcpts.demos.minilm import model_dir

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(model_dir() / name, folder / name)
    return folder


def _embed(resolved, sentences):
    enc = resolved.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return resolved.model(**enc).last_hidden_state


def test_huggingface_folder_and_text_from_s3(aws_env, bucket, tmp_path, monkeypatch):
    local = _tiny_bert(tmp_path / "tiny-bert")
    s3.upload(local, f"s3://{bucket}/models/tiny-bert")
    lines = "\n".join(f"sentence number {i} about sparse models" for i in range(30))
    (tmp_path / "text.txt").write_text(lines)
    s3.upload(tmp_path / "text.txt", f"s3://{bucket}/data/text.txt")

    uri = f"s3://{bucket}/models/tiny-bert/"
    remote = resolve_model(uri)
    assert (remote.source, remote.kind) == (uri, "huggingface")
    sentences = ["a sparse model", "another sentence"]
    assert torch.equal(_embed(remote, sentences), _embed(resolve_model(str(local)), sentences))
    [entry] = _entries(tmp_path / "cache")
    assert sorted(p.name for p in (entry / "tiny-bert").iterdir()) == sorted(
        p.name for p in local.iterdir()
    )

    data = resolve_data(Sources(model=uri, data=f"s3://{bucket}/data/text.txt"), remote)
    assert (data.source, data.kind, data.samples) == (f"s3://{bucket}/data/text.txt", "text", 30)

    # unchanged objects come from the cache: no download
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded again")

    with monkeypatch.context() as m:
        m.setattr(s3, "download", no_download)
        assert resolve_model(f"s3://{bucket}/models/tiny-bert").kind == "huggingface"

    # a changed object is a new version: downloaded into a new entry
    config = json.loads((local / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    aws_env.client().put_object(
        Bucket=bucket, Key="models/tiny-bert/config.json", Body=json.dumps(config).encode()
    )
    again = resolve_model(uri)
    assert again.model.config.layer_norm_eps == 1e-6
    assert len(_entries(tmp_path / "cache")) == 3  # model, text, changed model


def _digits_images(root: Path, x: torch.Tensor, y: torch.Tensor) -> None:
    from PIL import Image

    for i, (img, label) in enumerate(zip(x, y, strict=True)):
        folder = root / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img[0].numpy() * 255).round().astype("uint8"), mode="L").save(
            folder / f"{i:03d}.png"
        )


def test_digits_torchscript_weights_and_data_from_s3(aws_env, bucket, tmp_path):
    from safetensors.torch import save_file

    from fcpts.demos import digits, load_demo

    demo = load_demo("demo:digits-cnn")
    torch.jit.save(torch.jit.script(demo.model), str(tmp_path / "digits.pt"))
    state = {k: v.contiguous() for k, v in demo.model.state_dict().items()}
    save_file(state, str(tmp_path / "digits.safetensors"))
    x, y = digits.data()
    x, y = x[:60], y[:60]
    save_file({"x": x, "y": y}, str(tmp_path / "tensors.safetensors"))
    _digits_images(tmp_path / "images", x, y)
    for name in ("digits.pt", "digits.safetensors", "tensors.safetensors", "images"):
        s3.upload(tmp_path / name, f"s3://{bucket}/digits/{name}")

    scripted = resolve_model(f"s3://{bucket}/digits/digits.pt")
    assert (scripted.kind, scripted.source) == ("torchscript", f"s3://{bucket}/digits/digits.pt")
    built = resolve_model(
        "fcpts.demos.digits:DigitsCNN", weights=f"s3://{bucket}/digits/digits.safetensors"
    )
    with torch.no_grad():
        want = demo.model(x)
        assert torch.equal(scripted.model(x), want)
        assert torch.equal(built.model(x), want)

    for name, kind in (("tensors.safetensors", "tensors"), ("images", "images")):
        uri = f"s3://{bucket}/digits/{name}"
        local = resolve_data(Sources(model="m", data=str(tmp_path / name), image_mode="L"), built)
        remote = resolve_data(Sources(model="m", data=uri, image_mode="L"), built)
        assert (remote.kind, remote.source, remote.samples) == (kind, uri, 60)
        assert remote.digest == local.digest
        a, b = local.split("calibration", 20, 8), remote.split("calibration", 20, 8)
        assert all(
            torch.equal(p["x"], q["x"]) and torch.equal(p["y"], q["y"])
            for p, q in zip(a, b, strict=True)
        )
    assert load_weights(f"s3://{bucket}/digits/digits.safetensors").keys() == state.keys()


def test_killed_download_leaves_no_entry(aws_env, bucket, tmp_path):
    s3.upload(_tiny_bert(tmp_path / "bert"), f"s3://{bucket}/bert")
    client = s3.make_client()
    gets = []

    def fail_third_get(**kwargs):
        gets.append(1)
        if len(gets) >= 3:
            raise ConnectionResetError("simulated network failure")

    client.meta.events.register("before-call.s3.GetObject", fail_third_get)
    root = tmp_path / "cache"
    with pytest.raises(ServiceError, match="lost the connection"):
        cache.fetch(f"s3://{bucket}/bert/", cache=root, client=client)
    assert list((root / bucket).iterdir()) == []  # no entry, no temporary folder
    got = cache.fetch(f"s3://{bucket}/bert/", cache=root)
    assert got.name == "bert" and (got / "config.json").is_file()


def test_keys_leaving_the_folder_are_refused(aws_env, bucket, tmp_path):
    uri = f"s3://{bucket}/data/"
    assert cache.relative_key("data/", "data/a/b.png", uri) == "a/b.png"
    for bad in ("data/../x", "data//x", "data/./x", "data/a/..", "other/x"):
        with pytest.raises(UserError, match="refusing to download.*leaves the folder"):
            cache.relative_key("data/", bad, uri)
    aws_env.client().put_object(Bucket=bucket, Key="data/ok.png", Body=b"x")
    aws_env.client().put_object(Bucket=bucket, Key="data//etc/passwd", Body=b"x")
    with pytest.raises(UserError, match=r"refusing to download .*data//etc/passwd"):
        resolve_data(Sources(model="m", data=uri), None)
    assert not (tmp_path / "cache" / "s3" / bucket).exists() or _entries(tmp_path / "cache") == []


def test_cache_root():
    assert cache.cache_root({"FCPTS_CACHE": "/c"}) == Path("/c/s3")
    assert cache.cache_root({"XDG_CACHE_HOME": "/x"}) == Path("/x/fcpts/s3")
    assert cache.cache_root({}) == Path.home() / ".cache" / "fcpts" / "s3"


# ------------------------------------------------------------------------------ errors


def test_missing_bucket_and_key(aws_env, bucket):
    for uri in ("s3://no-such-bucket/models/m/", "s3://no-such-bucket/m.pt"):
        with pytest.raises(UserError, match=rf"{uri}: bucket 'no-such-bucket' does not exist"):
            resolve_model(uri)
    with pytest.raises(UserError, match=rf"s3://{bucket}/models/m.pt: no object has this key"):
        resolve_model(f"s3://{bucket}/models/m.pt")
    with pytest.raises(UserError, match=rf"s3://{bucket}/data/: no objects under this prefix"):
        resolve_data(Sources(model="m", data=f"s3://{bucket}/data/"), None)
    with pytest.raises(UserError, match=rf"s3://{bucket}/w.safetensors: no object"):
        resolve_model("fcpts.demos.digits:DigitsCNN", weights=f"s3://{bucket}/w.safetensors")


def test_unreachable_endpoint(aws_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{services.free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    with pytest.raises(ServiceError) as info:
        resolve_model("s3://models/m/")
    assert "s3://models/m/" in str(info.value) and endpoint in str(info.value)


def test_wrong_credentials(tmp_path, monkeypatch):
    """moto checks credentials only with IAM auth switched on (see tests/test_s3.py)."""
    with services.start_moto(tmp_path) as moto:
        moto.client().create_bucket(Bucket="private")
        moto.client().put_object(Bucket="private", Key="m/config.json", Body=b"{}")
        req = urllib.request.Request(
            f"{moto.endpoint_url}/moto-api/reset-auth",
            data=b"0",
            method="POST",
            headers={"Content-Type": "text/plain"},
        )
        urllib.request.urlopen(req, timeout=services.HANG_GUARD_S).close()
        for k, v in moto.env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
        monkeypatch.setenv("FCPTS_CACHE", str(tmp_path / "cache"))
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        for uri in ("s3://private/m/", "s3://private/m/config.json"):
            with pytest.raises(UserError, match=rf"{uri}: .*does not know the access key"):
                resolve_model(uri)
