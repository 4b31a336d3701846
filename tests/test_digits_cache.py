"""The digits demo's data cache: written once, read back the same, remade when it is
corrupt or holds tensors of another layout (never trusted, never an error)."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from fcpts.demos import digits


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "fcpts" / "digits-data-v1.safetensors"


def _fresh():
    t = digits._shuffled_digits()
    return t["x"], t["y"]


def test_cache_is_written_and_read_back_equal(cache):
    x, y = digits.data()
    assert cache.is_file()
    want_x, want_y = _fresh()
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    again = load_file(str(cache))
    assert torch.equal(again["x"], want_x) and torch.equal(again["y"], want_y)


@pytest.mark.parametrize(
    "bad",
    [
        {"x": torch.zeros(5, 1, 8, 8), "y": torch.zeros(5, dtype=torch.int64)},
        {
            "x": torch.zeros(1797, 1, 8, 8, dtype=torch.float64),
            "y": torch.zeros(1797, dtype=torch.int64),
        },
        {"y": torch.zeros(1797, dtype=torch.int64)},
        None,  # not a safetensors file at all
    ],
)
def test_a_wrong_or_corrupt_cache_is_remade(cache, bad):
    cache.parent.mkdir(parents=True)
    if bad is None:
        cache.write_bytes(b"not a safetensors file")
    else:
        save_file(bad, str(cache))
    x, y = digits.data()
    want_x, want_y = _fresh()
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert torch.equal(load_file(str(cache))["x"], want_x)
