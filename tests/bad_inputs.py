"""The bad-input catalogue: every bad input we thought of, and the error it gets.

Each :class:`Row` is one `fcpts` command line with one mistake in it. The test
(tests/test_bad_input_catalogue.py) runs every row through the real CLI and checks that
it exits with the row's code, prints exactly one ``error:`` line on stderr (no
traceback), that the line says what the row expects, that no secret from the command line
is echoed, and that nothing which existed before was changed or removed.

docs/bad-inputs.md is written from these rows and the messages the CLI really prints::

    .venv/bin/python tests/bad_inputs.py --write docs/bad-inputs.md

and the test fails when the document and the CLI disagree, so the table stays true.

Placeholders in a row's command line and environment: ``{ws}`` the workspace folder (files
made by :func:`make_workspace`), ``{closed}`` a loopback port nothing listens on. Rows with
``needs="moto"`` run with the AWS variables of a moto S3 server on 127.0.0.1 that holds the
bucket ``fcpts-catalogue``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shlex
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fcpts.tracking.retry import scoped_env


@dataclass(frozen=True)
class Row:
    id: str
    area: str
    what: str
    argv: str
    expect: str
    code: int = 2
    secret: str | None = None
    needs: str | None = None
    env: tuple[tuple[str, str], ...] = ()


ROWS = (
    # targets
    Row(
        "target-one",
        "targets",
        "target sparsity 1.0 (a model of zeros)",
        "allocate --model demo:digits-cnn --target 1.0 --out {ws}/out",
        "strictly between 0 and 1",
    ),
    Row(
        "target-zero",
        "targets",
        "target sparsity 0",
        "allocate --model demo:digits-cnn --target 0 --out {ws}/out",
        "strictly between 0 and 1",
    ),
    Row(
        "target-percent",
        "targets",
        "target given in percent (70 for 70%)",
        "allocate --model demo:digits-cnn --target 70 --out {ws}/out",
        "e.g. 0.7 for 70% zeros",
    ),
    Row(
        "target-text",
        "targets",
        "target that is not a number",
        "allocate --model demo:digits-cnn --target high --out {ws}/out",
        "invalid float value: 'high'",
    ),
    Row(
        "tolerance-nan",
        "targets",
        "gate tolerance NaN",
        "run --model demo:digits-cnn --target 0.5 --tolerance nan --root {ws}/runs",
        "finite number >= 0",
    ),
    # bounds and layer selection
    Row(
        "bounds-inverted",
        "bounds",
        "per-layer bounds with min above max",
        "allocate --model demo:digits-cnn --target 0.5 --bounds features.*=0.9:0.1 --out {ws}/out",
        "min 0.9 is above max 0.1",
    ),
    Row(
        "bounds-syntax",
        "bounds",
        "bounds without =MIN:MAX",
        "allocate --model demo:digits-cnn --target 0.5 --bounds features.* --out {ws}/out",
        "--bounds takes PATTERN=MIN:MAX",
    ),
    Row(
        "bounds-infeasible",
        "bounds",
        "min-sparsity bounds that force more zeros than the target",
        "allocate --model demo:digits-cnn --target 0.5 --min-sparsity 0.9 --out {ws}/out",
        "lower min_sparsity",
    ),
    Row(
        "include-nomatch",
        "bounds",
        "an --include pattern that matches no layer",
        "allocate --model demo:digits-cnn --target 0.5 --include encoder.* --out {ws}/out",
        "layer names look like: features.0",
    ),
    # allocator settings
    Row(
        "method-unknown",
        "settings",
        "an allocator that does not exist",
        "allocate --model demo:digits-cnn --target 0.5 --method magic --out {ws}/out",
        "choose one of erk, fcpts, global, owl,",
    ),
    Row(
        "blockwise-not-a-decoder",
        "settings",
        "block-wise allocation of a model that is not a decoder",
        "allocate --model demo:digits-cnn --target 0.5 --blockwise on --out {ws}/out",
        "--blockwise on: it needs a Hugging Face decoder folder",
    ),
    Row(
        "memory-mb-negative",
        "settings",
        "a negative block-wise memory bound",
        "allocate --model demo:digits-cnn --target 0.5 --blockwise auto --memory-mb -1 "
        "--out {ws}/out",
        "--memory-mb must be >= 0",
    ),
    Row(
        "setting-typo",
        "settings",
        "a misspelt allocator setting",
        "allocate --model demo:digits-cnn --target 0.5 --set itters=3 --out {ws}/out",
        "has no setting 'itters'",
    ),
    Row(
        "setting-negative-lam",
        "settings",
        "a negative lambda",
        "allocate --model demo:digits-cnn --target 0.5 --set lam=-1 --out {ws}/out",
        "lam must be >= 0",
    ),
    Row(
        "setting-syntax",
        "settings",
        "--set without =VALUE",
        "allocate --model demo:digits-cnn --target 0.5 --set lam --out {ws}/out",
        "--set takes KEY=VALUE",
    ),
    Row(
        "iters-zero",
        "settings",
        "zero iterations",
        "allocate --model demo:digits-cnn --target 0.5 --iters 0 --out {ws}/out",
        "--iters must be positive",
    ),
    Row(
        "batch-zero",
        "settings",
        "batch size 0",
        "allocate --model demo:digits-cnn --target 0.5 --batch-size 0 --out {ws}/out",
        "--batch-size must be positive",
    ),
    Row(
        "samples-negative",
        "settings",
        "a negative calibration sample count",
        "allocate --model demo:digits-cnn --target 0.5 --calibration-samples -5 --out {ws}/out",
        "--calibration-samples must be positive",
    ),
    Row(
        "setting-wrong-type",
        "settings",
        "an allocator setting of the wrong type (a list for a number)",
        "allocate --model demo:digits-cnn --target 0.5 --set lam=[1,2] --out {ws}/out",
        "fcpts setting lam must be a number, got [1, 2]",
    ),
    Row(
        "sparsegpt-allocation-unknown",
        "settings",
        "sparsegpt with a base allocation that is no method",
        "allocate --model demo:digits-cnn --target 0.5 --method sparsegpt --set allocation=magic --out {ws}/out",
        "allocation must be one of",
    ),
    Row(
        "sparsegpt-nm-syntax",
        "settings",
        "sparsegpt with an N:M pattern whose n is not below m",
        "allocate --model demo:digits-cnn --target 0.5 --method sparsegpt --set nm=4:2 --out {ws}/out",
        "nm must look like '2:4'",
    ),
    Row(
        "sparsegpt-nm-target",
        "settings",
        "sparsegpt 2:4 at a target the pattern cannot hold",
        "allocate --model demo:digits-cnn --target 0.7 --method sparsegpt --set nm=2:4 --out {ws}/out",
        "cannot hold exactly",
    ),
    # model sources
    Row(
        "demo-unknown",
        "model sources",
        "a demo that does not exist",
        "allocate --model demo:resnet --target 0.5 --out {ws}/out",
        "choose one of demo:minilm",
    ),
    Row(
        "model-missing",
        "model sources",
        "a model folder that does not exist",
        "allocate --model {ws}/no-such-model --target 0.5 --out {ws}/out",
        "does not exist",
    ),
    Row(
        "model-not-callable",
        "model sources",
        "module:function naming something that is not callable",
        "allocate --model os:sep --target 0.5 --out {ws}/out",
        "is not callable",
    ),
    Row(
        "model-module-missing",
        "model sources",
        "module:function whose module is not installed",
        "allocate --model no_such_pkg.models:net --weights {ws}/garbage.pt --target 0.5 --out {ws}/out",
        "cannot be imported",
    ),
    Row(
        "weights-for-demo",
        "model sources",
        "--weights given for a demo model",
        "allocate --model demo:digits-cnn --weights {ws}/garbage.pt --target 0.5 --out {ws}/out",
        "does not apply to the demo",
    ),
    Row(
        "calibration-missing",
        "model sources",
        "--calibration pointing to a folder that does not exist",
        "allocate --calibration {ws}/no-calibration --target 0.5 --out {ws}/out",
        "point --calibration to the --out folder of `fcpts calibrate`",
    ),
    Row(
        "sparse-not-allocated",
        "model sources",
        "--sparse pointing to a folder that is not an allocation",
        "evaluate --model demo:digits-cnn --sparse {ws}/existing --out {ws}/eval",
        "holds no manifest.json",
    ),
    # data sources, shapes, dtypes
    Row(
        "data-missing",
        "data sources",
        "a data file that does not exist",
        "allocate --model demo:digits-cnn --data {ws}/no-such.npy --target 0.5 --out {ws}/out",
        "does not exist",
    ),
    Row(
        "text-for-cnn",
        "data sources",
        "text data for a model without a tokenizer",
        "allocate --model demo:digits-cnn --data {ws}/prose.txt --target 0.5 --out {ws}/out",
        "needs a model with a tokenizer",
    ),
    Row(
        "npz-wrong-key",
        "data sources",
        "an .npz file without the tensor 'x'",
        "allocate --model demo:digits-cnn --data {ws}/wrong-key.npz --target 0.5 --out {ws}/out",
        "has no tensor 'x'",
    ),
    Row(
        "npz-not-npz",
        "data sources",
        "a file named .npz that is not one",
        "allocate --model demo:digits-cnn --data {ws}/garbage.npz --target 0.5 --out {ws}/out",
        "is not a readable .npz file",
    ),
    Row(
        "data-too-few",
        "data sources",
        "one sample: too few for disjoint splits",
        "allocate --model demo:digits-cnn --data {ws}/one.npy --target 0.5 --out {ws}/out",
        "too few for a calibration split",
    ),
    Row(
        "shape-channels",
        "shapes",
        "images with 3 channels for a 1-channel model",
        "allocate --model demo:digits-cnn --data {ws}/rgb.npy --target 0.5 --out {ws}/out",
        "does not fit the model",
    ),
    Row(
        "dtype-int",
        "dtypes",
        "integer tensors for a float model",
        "allocate --model demo:digits-cnn --data {ws}/ints.npy --target 0.5 --out {ws}/out",
        "does not fit the model",
    ),
    Row(
        "dtype-strings",
        "dtypes",
        "an array of strings",
        "allocate --model demo:digits-cnn --data {ws}/strings.npy --target 0.5 --out {ws}/out",
        "not numbers",
    ),
    Row(
        "data-nan",
        "dtypes",
        "calibration data full of NaN",
        "allocate --model demo:digits-cnn --data {ws}/nan.npy --target 0.5 --out {ws}/out",
        "NaN",
    ),
    Row(
        "label-too-high",
        "data sources",
        "a label (57) beyond a 10-class model's outputs",
        "allocate --model demo:digits-cnn --data {ws}/label-57.npz --target 0.5 --out {ws}/out",
        "label 57 in",
    ),
    Row(
        "label-negative",
        "data sources",
        "a negative label (-3)",
        "allocate --model demo:digits-cnn --data {ws}/label-minus-3.npz --target 0.5 --out {ws}/out",
        "label -3 in",
    ),
    # devices
    Row(
        "device-cuda-absent",
        "devices",
        "--device cuda on a machine without a GPU",
        "allocate --model demo:digits-cnn --target 0.5 --device cuda --out {ws}/out",
        "use --device cpu",
    ),
    Row(
        "device-unknown",
        "devices",
        "a device fcpts does not know",
        "allocate --model demo:digits-cnn --target 0.5 --device tpu --out {ws}/out",
        "invalid choice: 'tpu'",
    ),
    # configs
    Row(
        "config-missing",
        "configs",
        "--config naming a file that does not exist",
        "allocate --config {ws}/no-such.yaml --out {ws}/out",
        "does not exist",
    ),
    Row(
        "config-yaml",
        "configs",
        "a config file that is not valid YAML",
        "allocate --config {ws}/broken.yaml --out {ws}/out",
        "is not valid YAML",
    ),
    Row(
        "config-unknown-key",
        "configs",
        "a config with an option fcpts does not have",
        "allocate --config {ws}/unknown-key.yaml --out {ws}/out",
        "unknown option 'bogus_key'",
    ),
    Row(
        "metrics-not-json",
        "configs",
        "--metrics pointing to a file that is not JSON",
        "register --metrics {ws}/prose.txt --sparse {ws}/existing --out {ws}/decision",
        "is not valid JSON",
    ),
    Row(
        "config-alias-bomb",
        "configs",
        "a config of a few hundred bytes whose YAML aliases nest to 9**10 values (billion laughs)",
        "allocate --config {ws}/alias-bomb.yaml --out {ws}/out",
        "expand it to more than 1 MiB",
    ),
    Row(
        "config-too-large",
        "configs",
        "a config file over the 1 MiB cap",
        "allocate --config {ws}/large.yaml --out {ws}/out",
        "is larger than 1 MiB",
    ),
    Row(
        "config-folder",
        "configs",
        "--config naming a folder",
        "allocate --config {ws}/existing --out {ws}/out",
        "is a folder, not a regular file",
    ),
    Row(
        "config-device",
        "configs",
        "--config naming a device (/dev/zero, endless)",
        "allocate --config /dev/zero --out {ws}/out",
        "is a character device, not a regular file",
    ),
    # outputs
    Row(
        "out-is-file",
        "outputs",
        "--out naming an existing file",
        "allocate --model demo:digits-cnn --target 0.5 --out {ws}/prose.txt",
        "is a file",
    ),
    Row(
        "root-is-file",
        "outputs",
        "run --root naming an existing file",
        "run --model demo:digits-cnn --target 0.5 --root {ws}/prose.txt",
        "is a file",
    ),
    Row(
        "compile-no-folder",
        "outputs",
        "compile into a folder that does not exist",
        "compile --out {ws}/no-such-folder/pipeline.yaml",
        "does not exist",
    ),
    Row(
        "checkpoint-edited",
        "checkpoints",
        "--resume from a checkpoint whose tensor data was edited under a valid header",
        "allocate --model demo:digits-cnn --target 0.5 --iters 2 --resume "
        "--checkpoint-dir {ws}/ckpt-edited --out {ws}/out",
        "checksum does not match its data",
    ),
    Row(
        "checkpoint-no-iteration",
        "checkpoints",
        "--resume from a checkpoint without an iteration",
        "allocate --model demo:digits-cnn --target 0.5 --iters 2 --resume "
        "--checkpoint-dir {ws}/ckpt-no-iteration --out {ws}/out",
        "delete it to start afresh",
    ),
    Row(
        "checkpoint-fingerprint-list",
        "checkpoints",
        "--resume from a checkpoint whose fingerprint is a list",
        "allocate --model demo:digits-cnn --target 0.5 --iters 2 --resume "
        "--checkpoint-dir {ws}/ckpt-fingerprint-list --out {ws}/out",
        "fingerprint is not a mapping",
    ),
    Row(
        "checkpoint-bad-tensor",
        "checkpoints",
        "--resume from a checkpoint whose state names a tensor it lacks",
        "allocate --model demo:digits-cnn --target 0.5 --iters 2 --resume "
        "--checkpoint-dir {ws}/ckpt-bad-tensor --out {ws}/out",
        "refers to a tensor it lacks",
    ),
    Row(
        "s3-index-no-sha",
        "outputs",
        "an s3:// output whose index has an entry without sha256",
        "evaluate --model demo:digits-cnn --sparse s3://fcpts-catalogue/index-no-sha "
        "--out {ws}/eval",
        "has no sha256",
        needs="moto",
    ),
    Row(
        "s3-index-file-and-folder",
        "outputs",
        "an s3:// output whose index lists manifest.json and manifest.json/x",
        "evaluate --model demo:digits-cnn --sparse s3://fcpts-catalogue/index-file-and-folder "
        "--out {ws}/eval",
        "listed as a file and as the folder",
        needs="moto",
    ),
    # URIs, credentials, servers
    Row(
        "sweep-storage-driver",
        "URIs",
        "a study storage whose database driver is not installed",
        "sweep --model demo:digits-cnn --target 0.5 --trials 1 --storage mysql://u@127.0.0.1:{closed}/db "
        "--out {ws}/sweep",
        "needs a database driver",
    ),
    Row(
        "sweep-storage-down",
        "servers",
        "a PostgreSQL study storage nobody listens on (password hidden)",
        "sweep --model demo:digits-cnn --target 0.5 --trials 1 "
        "--storage postgresql+psycopg2://fcpts:hunter2@127.0.0.1:{closed}/db --out {ws}/sweep",
        "could not open the study storage",
        code=1,
        secret="hunter2",
    ),
    Row(
        "sweep-trials-zero",
        "settings",
        "a sweep of zero trials on a new study",
        "sweep --model demo:digits-cnn --target 0.5 --trials 0 --out {ws}/sweep",
        "run more trials",
    ),
    Row(
        "tracking-scheme",
        "URIs",
        "a tracking URI MLflow cannot store runs in (password hidden)",
        "allocate --model demo:digits-cnn --target 0.5 --tracking-uri ftp://u:hunter2@files/runs "
        "--out {ws}/out",
        "which MLflow cannot store runs in",
        secret="hunter2",
    ),
    Row(
        "tracking-down",
        "servers",
        "an MLflow server nobody listens on",
        "allocate --model demo:digits-cnn --target 0.5 --iters 2 "
        "--tracking-uri http://127.0.0.1:{closed} --out {ws}/out",
        "check that the MLflow server is running",
        code=1,
        # MLflow's own retries span about a minute by default: one try keeps the row quick
        env=(("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0"),),
    ),
    Row(
        "s3-endpoint-down",
        "servers",
        "an S3 endpoint nobody listens on",
        "allocate --model s3://models/digits.pt --target 0.5 --out {ws}/out",
        "cannot reach the S3 endpoint",
        code=1,
        env=(
            ("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:{closed}"),
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-key"),
        ),
        secret="s3cr3t-key",
    ),
    Row(
        "s3-missing-bucket",
        "URIs",
        "an s3:// model in a bucket that does not exist",
        "allocate --model s3://no-such-bucket/digits.pt --target 0.5 --out {ws}/out",
        "no-such-bucket",
        needs="moto",
    ),
    Row(
        "s3-missing-key",
        "URIs",
        "an s3:// data file that does not exist in an existing bucket",
        "allocate --model demo:digits-cnn --data s3://fcpts-catalogue/no-such.npy --target 0.5 "
        "--out {ws}/out",
        "no-such.npy",
        needs="moto",
    ),
    Row(
        "s3-no-bucket-name",
        "URIs",
        "an s3:// URI without a bucket",
        "allocate --model demo:digits-cnn --data s3:///digits.npy --target 0.5 --out {ws}/out",
        "s3://",
    ),
    Row(
        "cron-five-fields",
        "schedules",
        "a standard 5-field cron for KFP's 6-field cron",
        "submit --host http://127.0.0.1:{closed} --schedule '0 3 * * *'",
        "six fields, seconds first",
    ),
    Row(
        "host-scheme",
        "URIs",
        "a KFP host that is not http(s)",
        "submit --host ftp://kfp.example",
        "must start with http:// or https://",
    ),
    Row(
        "host-credentials",
        "credentials",
        "a KFP host URL with a password in it",
        "submit --host http://admin:hunter2@127.0.0.1:{closed}",
        "must not carry credentials",
        secret="hunter2",
    ),
    Row(
        "host-down",
        "servers",
        "a KFP API nobody listens on",
        "submit --host http://127.0.0.1:{closed}",
        "cannot reach the KFP API",
        code=1,
    ),
    Row(
        "promote-unknown-model",
        "registry",
        "promoting a model that was never registered",
        "promote no-such-model 1 --tracking-uri sqlite:///{ws}/mlruns/mlflow.db",
        "there is no registered model 'no-such-model'",
    ),
    Row(
        "promote-bad-version",
        "registry",
        "a version that is not a number",
        "promote some-model latest --tracking-uri sqlite:///{ws}/mlruns/mlflow.db",
        "must be a version number",
    ),
    Row(
        "register-from-nothing",
        "registry",
        "register --from a folder that holds no result",
        "register --from {ws}/existing --tracking-uri sqlite:///{ws}/mlruns/mlflow.db",
        "no result there",
    ),
)


QUIET = ("calibrate", "allocate", "evaluate", "register", "run", "sweep")  # take --quiet
S3_BUCKET = "fcpts-catalogue"  # exists on the moto server of rows with needs="moto"
_SHA = "0" * 64
# objects in S3_BUCKET that rows read (put by fill_bucket)
S3_OBJECTS = {
    "index-no-sha/fcpts-index.json": {"format": 1, "files": {"manifest.json": {"size": 2}}},
    "index-file-and-folder/fcpts-index.json": {
        "format": 1,
        "files": {
            "manifest.json": {"sha256": _SHA, "size": 2},
            "manifest.json/x": {"sha256": _SHA, "size": 2},
        },
    },
}


def fill_bucket(client) -> None:
    """Create S3_BUCKET when missing and put S3_OBJECTS in it."""
    if S3_BUCKET not in {b["Name"] for b in client.list_buckets()["Buckets"]}:
        client.create_bucket(Bucket=S3_BUCKET)
    for key, value in S3_OBJECTS.items():
        client.put_object(Bucket=S3_BUCKET, Key=key, Body=json.dumps(value).encode())


def _checkpoint(folder: Path, edit=None, tamper: bool = False) -> None:
    """A checkpoint as fcpts writes it, its header edited (and sealed again) by ``edit``,
    or its tensor data changed after it was sealed (``tamper``)."""
    import torch
    from safetensors.torch import save_file

    from fcpts import checkpoint as ckpt

    tensors: dict = {"theta": torch.zeros(4)}
    meta = {
        "format": ckpt.FORMAT,
        "iteration": 1,
        "fingerprint": {"settings": _SHA},
        "state": ckpt.to_storable({"lam": 1.0, "m": torch.ones(2)}, tensors, "state"),
    }
    if edit:
        edit(meta)
    meta["checksum"] = ckpt.checksum(meta, tensors)
    if tamper:
        tensors["theta"] = tensors["theta"] + 1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        tensors, str(folder / ckpt.FILE_NAME), metadata={"fcpts.checkpoint": json.dumps(meta)}
    )


def _bad_tensor(meta: dict) -> None:
    meta["state"]["__dict__"][1][1] = {"__tensor__": "state.nothing"}


def alias_bomb(levels: int = 10) -> str:
    """A billion-laughs YAML value: a few hundred bytes, 9**levels strings written out."""
    parts = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    parts += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(parts) + "]"


def make_workspace(ws: Path) -> None:
    """The files the rows point at, and an existing folder that must survive every row."""
    ws.mkdir(parents=True, exist_ok=True)
    (ws / "existing").mkdir(exist_ok=True)
    (ws / "existing" / "keep.txt").write_text("results of an earlier run\n")
    (ws / "prose.txt").write_text("Readability counts.\nErrors should never pass silently.\n")
    (ws / "broken.yaml").write_text("target: [0.5\n")
    (ws / "unknown-key.yaml").write_text("model: demo:digits-cnn\ntarget: 0.5\nbogus_key: 1\n")
    (ws / "alias-bomb.yaml").write_text(f"model: demo:digits-cnn\ntarget: {alias_bomb()}\n")
    (ws / "large.yaml").write_text("target: 0.5\n" + "# padding\n" * 110_000)
    (ws / "garbage.pt").write_bytes(b"not a checkpoint")
    (ws / "garbage.npz").write_bytes(b"not an archive")
    images = np.zeros((30, 1, 8, 8), dtype=np.float32)
    np.save(ws / "one.npy", images[:1])
    np.save(ws / "rgb.npy", np.zeros((30, 3, 8, 8), dtype=np.float32))
    np.save(ws / "ints.npy", images.astype(np.int64))
    np.save(ws / "strings.npy", np.array(["a picture"] * 30))
    np.save(ws / "nan.npy", np.full_like(images, np.nan))
    np.savez(ws / "wrong-key.npz", images=images)
    for name, label in (("label-57", 57), ("label-minus-3", -3)):
        np.savez(ws / f"{name}.npz", x=images, y=np.array([0] * 29 + [label]))
    _checkpoint(ws / "ckpt-edited", tamper=True)
    _checkpoint(ws / "ckpt-no-iteration", edit=lambda m: m.pop("iteration"))
    _checkpoint(ws / "ckpt-fingerprint-list", edit=lambda m: m.update(fingerprint=["x"]))
    _checkpoint(ws / "ckpt-bad-tensor", edit=_bad_tensor)


def closed_port() -> int:
    """A loopback port that nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command_line(row: Row, ws: Path) -> list[str]:
    text = row.argv.format(ws=ws, closed=closed_port())
    return shlex.split(text) + (["--quiet"] if row.argv.split()[0] in QUIET else [])


def snapshot(ws: Path) -> dict[str, str]:
    """sha256 of every file under ``ws``: what a failed command must leave as it was."""
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(ws.rglob("*"))
        if p.is_file()
    }


@dataclass
class Outcome:
    code: int
    stderr: str

    @property
    def message(self) -> str:
        lines = [line for line in self.stderr.splitlines() if "error:" in line]
        return lines[-1] if lines else ""


def row_env(row: Row, s3_env: dict[str, str] | None) -> dict[str, str]:
    port = str(closed_port())
    env = {k: v.replace("{closed}", port) for k, v in row.env}
    if row.needs == "moto":
        env.update(s3_env or {})
    return env


def run_row(row: Row, ws: Path, s3_env: dict[str, str] | None = None) -> Outcome:
    """Run one row through the real CLI, in this process (``s3_env``: the AWS variables of
    the moto server, for rows that need it)."""
    from fcpts.cli import main

    err, out = io.StringIO(), io.StringIO()
    with (
        scoped_env(row_env(row, s3_env)),
        contextlib.redirect_stderr(err),
        contextlib.redirect_stdout(out),
    ):
        try:
            code = main(command_line(row, ws))
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, err.getvalue())


def shown(message: str, ws: Path) -> str:
    """The message as the document shows it: the workspace and ports made generic."""
    text = message.replace(str(ws), "<ws>")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:<port>", text)
    text = re.sub(r"port[ =]\d+", "port <port>", text)
    return re.sub(r"\d+\.\d+ s\b", "<t> s", text)


def document(rows: tuple[Row, ...], messages: dict[str, str]) -> str:
    areas = sorted({r.area for r in rows})
    out = [
        "# Bad inputs and the errors they get",
        "",
        "Every row is a test (tests/test_bad_input_catalogue.py runs it through the real "
        "`fcpts` CLI and compares the message with this table). Written by "
        "`.venv/bin/python tests/bad_inputs.py --write docs/bad-inputs.md`; do not edit by hand.",
        "",
        "Exit code 2: a mistake in the input that the user can fix. Exit code 1: a service "
        "that could not be reached. Either way one line on stderr, no traceback, nothing that "
        "existed before is changed, and no password from the command line is echoed.",
        "",
        f"{len(rows)} rows in {len(areas)} areas: {', '.join(areas)}.",
        "",
        "| # | area | bad input | command (`fcpts ...`) | exit | error |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows, 1):
        cmd = r.argv.replace("{ws}", "<ws>").replace("{closed}", "<port>")
        msg = messages[r.id].replace("|", "\\|")
        out.append(f"| {i} | {r.area} | {r.what} | `{cmd}` | {r.code} | `` {msg} `` |")
    return "\n".join(out) + "\n"


def _write(path: str) -> int:
    import tempfile

    import services

    with tempfile.TemporaryDirectory() as tmp:
        ws = Path(tmp) / "ws"
        make_workspace(ws)
        with services.start_moto(tmp) as moto:
            fill_bucket(moto.client())
            messages = {}
            for row in ROWS:
                outcome = run_row(row, ws, moto.env())
                messages[row.id] = shown(outcome.message, ws)
                print(f"[{outcome.code}] {row.id}: {messages[row.id]}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(document(ROWS, messages))
    print(f"wrote {path} ({len(ROWS)} rows)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if len(sys.argv) != 3 or sys.argv[1] != "--write":
        raise SystemExit("usage: tests/bad_inputs.py --write docs/bad-inputs.md")
    raise SystemExit(_write(sys.argv[2]))
