"""save_decomposed / load_decomposed: round trips, the argument order, wrong files leave the module unchanged."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from torch import nn

from lightning_dwf.decompose import DecomposeConfig, decompose_, decomposed_tensors, load_decomposed, save_decomposed
from lightning_dwf.errors import DWFFileError
from lightning_dwf.export import load_compressed, load_state, save_compressed, save_state

from .helpers import CONFIG, KINDS, build, inputs


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_save_load_round_trip(tmp_path, kind: str, bits: int | None) -> None:
    model = build(kind)
    decompose_(model, DecomposeConfig(bits=bits, **CONFIG))
    x = inputs(kind)
    out = model(x)
    path = tmp_path / "qsd.safetensors"
    report = save_decomposed(model, path)
    assert report.file_bytes == os.path.getsize(path) and report.bits == bits
    assert report.layers == ("0.weight", "2.weight")
    assert report.dense_bytes == sum(t.numel() * 4 for t in build(kind).state_dict().values())
    assert report.ratio == report.dense_bytes / report.file_bytes  # tiny models: the header dominates
    stored = {t.name for t in report.compressed.tensors}
    assert {"0.weight.qsd_u", "0.weight.qsd_v", "2.weight.qsd_u"} <= stored and "0.weight" not in stored
    fresh = build(kind, seed=5)
    load_decomposed(fresh, path)
    assert [t.name for t in decomposed_tensors(fresh)] == ["0.weight", "2.weight"]
    torch.testing.assert_close(fresh(x), out, rtol=1e-5, atol=1e-6)
    plain = load_decomposed(build(kind, seed=6), path, collapse=True)
    assert not decomposed_tensors(plain)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-6)
    for t, s in zip(decomposed_tensors(model), decomposed_tensors(fresh)):  # same masks: fine-tuning can go on
        assert torch.equal(t.parametrization.mask_u, s.parametrization.mask_u)


def test_save_keeps_dense_layers_and_refuses_mismatches(tmp_path) -> None:
    model = build("linear")
    decompose_(model, DecomposeConfig(bits=None, exclude=["2"], **CONFIG))
    path = tmp_path / "qsd.safetensors"
    save_decomposed(model, path)
    fresh = load_decomposed(build("linear", seed=3), path)
    x = inputs("linear")
    torch.testing.assert_close(fresh(x), model(x))
    assert torch.equal(fresh[2].weight, model[2].weight)  # lossless dense layer
    with pytest.raises(ValueError, match="does not match the module"):
        load_decomposed(nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10)), path)
    with pytest.raises(ValueError, match="parametrized"):
        load_decomposed(fresh, path)
    with pytest.raises(ValueError, match="the file has no '0.weight'"):
        load_compressed(build("linear"), path)
    with pytest.raises(ValueError, match="no decomposed tensor"):
        save_decomposed(build("linear"), path)
    with pytest.raises(ValueError, match="save_decomposed"):
        save_compressed(model, tmp_path / "x.safetensors")
    plain_path = tmp_path / "plain.safetensors"
    save_compressed(build("linear"), plain_path)
    with pytest.raises(ValueError, match="not written by save_decomposed"):
        load_decomposed(build("linear"), plain_path)
    with pytest.raises(FileNotFoundError):
        load_decomposed(build("linear"), tmp_path / "missing.safetensors")


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("collapse", [False, True])
def test_the_old_argument_order_loads_identically_and_warns(tmp_path, collapse: bool) -> None:
    model = build("conv2d")
    decompose_(model, DecomposeConfig(bits=4, **CONFIG))
    path = tmp_path / "qsd.safetensors"
    save_decomposed(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new order warns about nothing
        new = load_decomposed(build("conv2d", seed=5), path, collapse=collapse)
    for old_path in (path, str(path)):
        with pytest.warns(FutureWarning, match=r"load_decomposed\(module, path\)"):
            old = load_decomposed(old_path, build("conv2d", seed=5), collapse=collapse)
        assert_same_state(state_of(old), state_of(new))
        assert type(old[0]).__name__ == type(new[0]).__name__ and len(decomposed_tensors(old)) == (0 if collapse else 2)
    with pytest.raises(TypeError, match="`module`"):
        load_decomposed(str(path), str(path))


def test_a_wrong_file_raises_dwf_file_error_and_changes_nothing(tmp_path) -> None:
    model = build("linear")
    decompose_(model, DecomposeConfig(bits=8, **CONFIG))
    good = tmp_path / "qsd.safetensors"
    save_decomposed(model, good)
    stored, metadata = load_state(good)
    layers = json.loads(metadata["qsd"])

    def rewrite(name: str, tensors: dict, qsd: dict | str) -> str:
        path = tmp_path / name
        save_state(tensors, path, bits=8, metadata={"qsd": qsd if isinstance(qsd, str) else json.dumps(qsd)})
        return path

    plain = tmp_path / "plain.safetensors"
    save_compressed(build("linear"), plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    wrong_shape = dict(layers, **{"0.weight": dict(layers["0.weight"], shape=[32, 41])})
    renamed = {k.replace("2.", "3.", 1): v for k, v in stored.items()}
    uneven = dict(stored, **{"0.weight.qsd_v": stored["0.weight.qsd_v"][:-1]})  # rank of V != rank of U
    cases = {
        "not a decomposition file": (plain, "not written by save_decomposed"),
        "not a safetensors file": (garbage, "not a readable"),
        "a layer of another shape": (rewrite("shape.safetensors", stored, wrong_shape), "does not match"),
        "layer names the module lacks": (rewrite("names.safetensors", renamed, {k.replace("2.", "3.", 1): v
                                                                                for k, v in layers.items()}),
                                         "does not match the module"),
        "factors that do not multiply": (rewrite("uneven.safetensors", uneven, layers), "does not match"),
        "a malformed header": (rewrite("header.safetensors", stored, "[1, 2]"), "malformed"),
    }
    for case, (path, message) in cases.items():
        target = build("linear", seed=4)
        before = state_of(target)
        with pytest.raises(DWFFileError, match=message):
            load_decomposed(target, path)
        assert_same_state(state_of(target), before)
        assert not decomposed_tensors(target) and type(target[0]) is nn.Linear, case
    with pytest.raises(DWFFileError, match="does not match the module"):
        load_decomposed(nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10)), good)
    assert issubclass(DWFFileError, ValueError)
