"""Data as users hold it: a source per split (--calibration-data, --validation-data,
--evaluation-data) with --data split in thirds as the fallback, and ImageFolder images
resized, cropped and normalised (or handed to the user's --transform)."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from fcpts.errors import UserError
from fcpts.sources import Sources, resolve_data, resolve_model, sample_digests
from fcpts.steps import calibrate, evaluate

DIGITS = "demo:digits-cnn"
CNN = "fcpts.demos.digits:DigitsCNN"


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """Three .npz files of distinct load_digits samples (40, 20 and 40 of them) and one of
    60 for --data; ``x`` is (N, 1, 8, 8), ``y`` the labels."""
    from fcpts.demos.digits import data

    x, y = data()
    folder = tmp_path_factory.mktemp("digits-files")
    spans = {"cal": (0, 40), "val": (40, 60), "eval": (60, 100), "all": (100, 160)}
    files = {}
    for name, (lo, hi) in spans.items():
        files[name] = str(folder / f"{name}.npz")
        np.savez(files[name], x=x[lo:hi].numpy(), y=y[lo:hi].numpy())
    files["flat"] = str(folder / "flat.npz")
    np.savez(files["flat"], x=x[60:100].reshape(40, 64).numpy(), y=y[60:100].numpy())
    files["garbage"] = str(folder / "garbage.npz")
    (folder / "garbage.npz").write_bytes(b"not a zip at all")
    return files


def _digests(path):
    return set(sample_digests([{"x": torch.from_numpy(np.load(path)["x"])}]))


def test_each_split_reads_its_own_source_whole_and_records_where_it_came_from(
    digits_files, tmp_path
):
    sources = Sources(
        model=DIGITS,
        data=digits_files["all"],
        calibration_data=digits_files["cal"],
        evaluation_data=digits_files["eval"],
    )
    cal = calibrate(sources, tmp_path / "cal", batch_size=16)
    info = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    # the whole calibration file (40 of the default 300 asked), nothing else
    assert info["samples"] == 40 and set(info["sample_digests"]) == _digests(digits_files["cal"])
    assert info["data"]["source"] == digits_files["cal"] and info["data"]["flag"] == (
        "--calibration-data"
    )
    splits = info["data"]["splits"]
    sha = hashlib.sha256(open(digits_files["eval"], "rb").read()).hexdigest()
    assert splits["evaluation"] == {**splits["evaluation"], "source": digits_files["eval"]}
    assert splits["evaluation"]["sha256"] == sha and splits["evaluation"]["samples"] == 40
    assert splits["evaluation"]["split_by"] == "whole"
    # the split without a source of its own: a third of --data
    assert splits["validation"]["source"] == digits_files["all"]
    assert splits["validation"]["split_by"] == "thirds" and splits["validation"]["flag"] == "--data"
    assert cal.info["data"]["splits"]["calibration"]["samples"] == 40


def test_evaluation_reads_its_own_source(digits_sparse, digits_files, tmp_path):
    sources = Sources(model=DIGITS, evaluation_data=digits_files["eval"])
    result = evaluate(sources, digits_sparse.path, tmp_path / "ev", latency_seconds=0.01)
    ev = result.metrics["evaluation"]
    assert ev["data"] == digits_files["eval"] and ev["samples"] == 40
    assert ev["overlap_with_calibration"] == 0
    with pytest.raises(
        UserError,
        match="--evaluation-data .*eval.npz holds 40 samples, fewer "
        "than the 50 asked with --evaluation-samples",
    ):
        evaluate(sources, digits_sparse.path, tmp_path / "ev2", samples=50, latency_seconds=0.01)
    assert not (tmp_path / "ev2").exists()


def test_data_alone_is_split_in_thirds(digits_files):
    model = resolve_model(DIGITS)
    data = resolve_data(Sources(model=DIGITS, data=digits_files["all"]), model)
    got = {name: data.split(name, 100, 8) for name in ("calibration", "validation", "evaluation")}
    counts = {name: sum(b["x"].shape[0] for b in batches) for name, batches in got.items()}
    assert counts == {"calibration": 20, "validation": 20, "evaluation": 20}
    digests = [set(sample_digests(batches)) for batches in got.values()]
    assert not (digests[0] & digests[2]) and not (digests[0] & digests[1])
    with pytest.raises(
        UserError,
        match="--data .*gives the calibration split a third of its 60: "
        "20 samples, fewer than the 30 asked",
    ):
        data.split("calibration", 30, 8, exact=True)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"calibration_data": "{dir}/no-such.npz"},
            "--calibration-data: data file or folder .*does not exist",
        ),
        ({"evaluation_data": "{garbage}"}, "--evaluation-data: .*is not a readable .npz file"),
        (
            {"calibration_data": "{cal}", "evaluation_data": "{flat}"},
            "--calibration-data .*cal.npz .* and --evaluation-data .*flat.npz .* different shapes "
            r"\[1, 8, 8\] and \[64\]",
        ),
        (
            {"calibration_data": "{cal}", "evaluation_data": "{cal}"},
            "--calibration-data .* and --evaluation-data .* hold the same data",
        ),
        ({"data": "{all}", "validation_data": "{all}"}, "hold the same data"),
    ],
)
def test_bad_split_sources_name_their_flag(digits_files, tmp_path, fields, message):
    names = {**digits_files, "dir": str(tmp_path)}
    sources = Sources(model=DIGITS, **{k: v.format(**names) for k, v in fields.items()})
    with pytest.raises(UserError, match=message) as err:
        calibrate(sources, tmp_path / "cal")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "cal").exists()


def test_too_few_calibration_samples_asked_is_refused(digits_files, tmp_path):
    sources = Sources(model=DIGITS, calibration_data=digits_files["val"])
    with pytest.raises(
        UserError,
        match="--calibration-data .*val.npz holds 20 samples, fewer "
        "than the 32 asked with --calibration-samples: ask for at most 20",
    ):
        calibrate(sources, tmp_path / "cal", samples=32)


def test_the_flags_components_and_pipeline_take_the_split_sources(capsys):
    from components.build import STEPS, parameters
    from fcpts.cli import main
    from pipelines.common import pipeline_parameters

    flags = ("--calibration-data", "--validation-data", "--evaluation-data")
    for command in ("run", "calibrate", "evaluate", "allocate"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        shown = capsys.readouterr().out
        assert all(flag in shown for flag in flags), command
    for step in ("calibrate", "evaluate"):
        dests = {s.dest for s in parameters(STEPS[step])}
        assert {"calibration_data", "validation_data", "evaluation_data", "center_crop"} <= dests
    assert "recalibrate_bn" in {s.dest for s in parameters(STEPS["evaluate"])}
    names = {p.name for p in pipeline_parameters(("calibrate", "allocate", "evaluate", "register"))}
    assert {"evaluation_data", "mean", "std", "transform"} <= names


# ---------------------------------------------------------------------- image folders


def _image_folder(root):
    """Two classes; ``a/grid.png`` a 4 x 4 grey image whose pixel (x, y) is 10*y + x,
    ``b/wide.png`` a 6 x 3 grey image all 200, ``b/tall.png`` a 3 x 6 one all 100."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    grid = np.array([[10 * y + x for x in range(4)] for y in range(4)], dtype=np.uint8)
    Image.fromarray(grid, mode="L").save(root / "a" / "grid.png")
    Image.fromarray(np.full((3, 6), 200, np.uint8), mode="L").save(root / "b" / "wide.png")
    Image.fromarray(np.full((6, 3), 100, np.uint8), mode="L").save(root / "b" / "tall.png")
    return str(root)


def _images(sources):
    """The preprocessed image of every file, by file name."""
    from fcpts.sources.images import ImagePrep

    prep = ImagePrep.of(sources)
    root = sources.calibration_data
    from pathlib import Path

    return {p.name: prep.read(p) for p in sorted(Path(root).rglob("*.png"))}


def test_center_crop_and_normalisation_give_the_hand_computed_tensor(tmp_path):
    folder = _image_folder(tmp_path / "img")
    sources = Sources(
        model=CNN, calibration_data=folder, image_mode="L", center_crop=2, mean="0.5", std="0.25"
    )
    grid = _images(sources)["grid.png"]
    expected = (torch.tensor([[[11.0, 12.0], [21.0, 22.0]]]) / 255 - 0.5) / 0.25
    assert grid.shape == (1, 2, 2)
    torch.testing.assert_close(grid, expected)


def test_resize_keeps_the_aspect_ratio_on_the_shorter_side(tmp_path):
    folder = _image_folder(tmp_path / "img")
    images = _images(Sources(model=CNN, calibration_data=folder, image_mode="L", image_size=2))
    assert images["wide.png"].shape == (1, 2, 4) and images["tall.png"].shape == (1, 4, 2)
    torch.testing.assert_close(images["wide.png"], torch.full((1, 2, 4), 200 / 255))
    assert images["grid.png"].shape == (1, 2, 2)
    # resize then crop: every image 2 x 2, so the folder loads as one batch of the split
    sources = Sources(
        model=CNN, calibration_data=folder, image_mode="L", image_size=2, center_crop=2
    )
    data = resolve_data(sources, resolve_model(CNN))
    (batch,) = data.split("calibration", 10, 10)
    assert batch["x"].shape == (3, 1, 2, 2) and sorted(batch["y"].tolist()) == [0, 1, 1]
    assert data.sample_shape == (1, 2, 2)


def test_images_of_different_sizes_ask_for_a_crop(tmp_path):
    folder = _image_folder(tmp_path / "img")
    data = resolve_data(
        Sources(model=CNN, calibration_data=folder, image_mode="L"), resolve_model(CNN)
    )
    with pytest.raises(
        UserError, match="--calibration-data: images in .* different sizes.*--center-crop"
    ):
        data.split("calibration", 10, 10)


def test_a_transform_function_replaces_the_preprocessing(tmp_path):
    folder = _image_folder(tmp_path / "img")
    module = tmp_path / "prep.py"
    module.write_text(
        "import torch\n"
        "def first_pixel(img):\n"
        "    return torch.full((2, 3, 3), img.getpixel((0, 0))[0] / 100.0)\n"
        "def not_a_tensor(img):\n"
        "    return [1, 2]\n"
    )
    images = _images(Sources(model=CNN, calibration_data=folder, transform=f"{module}:first_pixel"))
    torch.testing.assert_close(images["wide.png"], torch.full((2, 3, 3), 2.0))
    torch.testing.assert_close(images["grid.png"], torch.full((2, 3, 3), 0.0))
    with pytest.raises(UserError, match="--transform .*not_a_tensor must return a .channels"):
        _images(Sources(model=CNN, calibration_data=folder, transform=f"{module}:not_a_tensor"))
    with pytest.raises(UserError, match="--transform replaces --image-size"):
        Sources(model=CNN, transform=f"{module}:first_pixel", image_size=4)
    with pytest.raises(UserError, match="--transform file .*missing.py does not exist"):
        _images(Sources(model=CNN, calibration_data=folder, transform=f"{tmp_path}/missing.py:f"))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"mean": "0.5,0.5"}, "--mean needs 3 values .*--image-mode RGB.*got 2"),
        ({"std": "0.2,0,0.2"}, "--std must not hold a zero"),
        ({"mean": "a,b,c"}, "--mean takes numbers"),
        ({"center_crop": 0}, "--center-crop must be a positive integer"),
    ],
)
def test_bad_preprocessing_options_name_their_flag(fields, message):
    with pytest.raises(UserError, match=message):
        Sources(model=CNN, **fields)


def test_mean_and_std_accept_one_value_per_channel_or_a_list():
    s = Sources(model=CNN, mean=[0.485, 0.456, 0.406], std="0.229 0.224 0.225")
    assert s.mean == "0.485,0.456,0.406" and s.std == "0.229,0.224,0.225"
    assert Sources.from_dict(s.to_dict()) == s


# ------------------------------------------------------------------ --recalibrate-bn


def test_evaluate_recalibrates_batchnorm_as_allocate_would(
    digits_calibration, digits_sparse, digits_files, tmp_path
):
    from fcpts.steps import allocate

    # the same allocation as digits_sparse, recalibrated by allocate
    done = allocate(
        digits_calibration.path,
        tmp_path / "sparse-bn",
        target=0.7,
        settings={"iters": 10},
        recalibrate_bn=True,
    )
    assert done.manifest["recalibrated_batchnorm_layers"] == 3
    assert [m["zeros"] for m in done.manifest["layers"]] == [
        m["zeros"] for m in digits_sparse.manifest["layers"]
    ]
    kw = {"latency_seconds": 0.01, "samples": 200}
    by_allocate = evaluate(Sources(DIGITS), done.path, tmp_path / "a", recalibrate_bn=True, **kw)
    by_evaluate = evaluate(
        Sources(DIGITS), digits_sparse.path, tmp_path / "b", recalibrate_bn=True, **kw
    )
    plain = evaluate(Sources(DIGITS), digits_sparse.path, tmp_path / "c", **kw)
    assert by_allocate.metrics["recalibrated_batchnorm_layers_in_evaluation"] == 0  # done
    assert by_evaluate.metrics["recalibrated_batchnorm_layers_in_evaluation"] == 3
    assert plain.metrics["recalibrated_batchnorm_layers_in_evaluation"] == 0
    for key in ("sparse", "secondary"):
        assert by_evaluate.metrics[key] == by_allocate.metrics[key]
    # and it mattered: without it the sparse model agrees less with the dense one
    assert plain.metrics["secondary"] != by_evaluate.metrics["secondary"]
    # other calibration data than the sparse model was made from: refused
    other = Sources(DIGITS, calibration_data=digits_files["cal"])
    with pytest.raises(UserError, match="--recalibrate-bn needs the calibration samples"):
        evaluate(other, digits_sparse.path, tmp_path / "d", recalibrate_bn=True, **kw)


def test_allocate_from_a_calibration_folder_takes_no_data_flag(
    digits_calibration, digits_files, tmp_path, capsys
):
    from fcpts.cli import main

    argv = ["allocate", "--calibration", str(digits_calibration.path), "--target", "0.5"]
    argv += ["--evaluation-data", digits_files["eval"], "--out", str(tmp_path / "out")]
    assert main([*argv, "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "--evaluation-data is not used with --calibration" in err
    assert not (tmp_path / "out").exists()
