"""Saving and loading: bit-exact round trips, module mismatches, the argument order, and a wrong file's error."""

from __future__ import annotations

import copy
import os
import struct
import warnings
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_dwf import factorize_
from lightning_dwf.errors import DWFFileError
from lightning_dwf.export import load_compressed, save_compressed

from .helpers import KINDS, SPARSITIES, assert_same_state, build, snapshot, sparsify_


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", KINDS)
def test_lossless_round_trip_is_bit_exact(tmp_path, kind, sparsity):
    model = sparsify_(build(kind), sparsity)
    report = save_compressed(model, tmp_path / "m.safetensors")
    fresh = build(kind, seed=123)
    assert load_compressed(fresh, tmp_path / "m.safetensors") is fresh
    assert_same_state(fresh, model.state_dict())
    assert report.file_bytes == os.path.getsize(tmp_path / "m.safetensors")
    assert [t.name for t in report.tensors] == list(model.state_dict())
    assert all(t.encoding == "raw" for t in report.tensors if t.name.endswith(("bias", "running_mean", "tracked")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_lossless_keeps_other_float_dtypes(tmp_path, dtype):
    model = sparsify_(build("batchnorm"), 0.9).to(dtype)
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = build("batchnorm", seed=5).to(dtype)
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert_same_state(fresh, model.state_dict())


@pytest.mark.parametrize("bits", [3, 16, True, "8"])
def test_bits_is_validated(tmp_path, bits):
    with pytest.raises(ValueError, match="`bits` must be None"):
        save_compressed(nn.Linear(2, 2), tmp_path / "m.safetensors", bits=bits)


def _named(second: str, width: int = 4, extra: bool = False) -> nn.Module:
    layers = OrderedDict(fc1=nn.Linear(6, 5), act=nn.ReLU())
    layers[second] = nn.Linear(5, width)
    if extra:
        layers["fc3"] = nn.Linear(width, 2)
    return nn.Sequential(layers)


@pytest.mark.parametrize(
    ("target", "message"),
    [
        (lambda: _named("head"), "the file has no 'head.weight'"),
        (lambda: _named("fc2", width=3), r"'fc2.weight' has shape \(4, 5\) in the file, \(3, 5\) in the module"),
        (lambda: _named("fc2").double(), "'fc1.weight' is float32 in the file, float64 in the module"),
        (lambda: _named("fc2", extra=True), "the file has no 'fc3.weight'"),
        (lambda: nn.Sequential(OrderedDict(fc1=nn.Linear(6, 5))), "the module has no 'fc2.weight'"),
    ],
    ids=["renamed", "shape", "dtype", "module-extra", "file-extra"],
)
def test_mismatched_module_is_refused_and_unchanged(tmp_path, target, message):
    save_compressed(sparsify_(_named("fc2"), 0.5), tmp_path / "m.safetensors")
    module = target()
    before = snapshot(module)
    with pytest.raises(ValueError, match=message):
        load_compressed(module, tmp_path / "m.safetensors")
    assert_same_state(module, before)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No compressed model file"):
        load_compressed(build("linear"), tmp_path / "nope.safetensors")


def test_factorized_module_is_refused(tmp_path):
    model = build("linear")
    factorize_(model, depth=3)
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        save_compressed(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    save_compressed(build("linear"), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        load_compressed(model, tmp_path / "plain.safetensors")


def test_save_does_not_change_the_module(tmp_path):
    model = sparsify_(build("batchnorm"), 0.9)
    before = snapshot(model)
    save_compressed(model, tmp_path / "m.safetensors", bits=4)
    assert_same_state(model, before)
    assert type(copy.deepcopy(model)[0]) is nn.Conv2d


@pytest.mark.parametrize("as_str", [False, True])
def test_old_argument_order_loads_identically_with_a_future_warning(tmp_path, as_str):
    model = sparsify_(build("batchnorm"), 0.9)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, bits=8)
    new, old = build("batchnorm", seed=3), build("batchnorm", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new order warns about nothing
        assert load_compressed(new, path) is new
    with pytest.warns(FutureWarning, match=r"load_compressed\(module, path\)"):
        assert load_compressed(str(path) if as_str else path, old) is old
    assert_same_state(old, new.state_dict())
    with pytest.warns(FutureWarning), pytest.raises(DWFFileError, match="the file has no 'fc1.weight'"):
        load_compressed(path, _named("head"))  # the old order still checks the file


def _wrong_files(tmp_path, path) -> dict[str, str]:
    """Files that are not a loadable copy of ``path`` for ``build("batchnorm")``, by kind of damage."""
    data = path.read_bytes()
    header = 8 + struct.unpack("<Q", data[:8])[0]
    flipped = bytearray(data)
    flipped[(header + len(data)) // 2] ^= 0x01
    save_file(build("batchnorm").state_dict(), str(tmp_path / "plain.safetensors"))
    save_compressed(build("linear"), tmp_path / "other.safetensors")
    (tmp_path / "flipped.safetensors").write_bytes(bytes(flipped))
    (tmp_path / "cut.safetensors").write_bytes(data[: header + 10])
    return {"plain": "not a lightning-dwf", "flipped": "checksum", "cut": "readable|checksum|corrupt",
            "other": "does not match the module"}


@pytest.mark.parametrize("old_order", [False, True])
def test_wrong_file_raises_dwf_file_error_and_changes_nothing(tmp_path, old_order):
    path = tmp_path / "m.safetensors"
    save_compressed(sparsify_(build("batchnorm"), 0.9), path)
    for kind, message in _wrong_files(tmp_path, path).items():
        module = build("batchnorm", seed=3)
        before = snapshot(module)
        wrong = tmp_path / f"{kind}.safetensors"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            with pytest.raises(DWFFileError, match=message) as info:
                load_compressed(*((wrong, module) if old_order else (module, wrong)))
        assert str(wrong) in str(info.value), kind
        assert isinstance(info.value, ValueError)
        assert_same_state(module, before)
