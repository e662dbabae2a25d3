"""The weight encodings: every candidate decodes, relative-index fillers, quantization, and the registry."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from lightning_dwf.errors import DWFFileError
from lightning_dwf.export import (
    Encoding,
    StoredWeight,
    WeightValues,
    decode_weight,
    encode_weight,
    encodings,
    load_compressed,
    register_encoding,
    save_compressed,
    unregister_encoding,
)
from lightning_dwf.export.codecs import code_stream

from .helpers import assert_same_state, build, sparsify_


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("shape", [(3, 700), (2, 5, 7), (1, 1), (4, 0)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.995, 1.0])
def test_every_encoding_decodes(shape, sparsity, bits):
    """Each candidate (dense, mask, rel8 with fillers, rel4 with fillers) decodes to the same tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) >= sparsity)
    candidates, entries, _ = encodings.candidates(w, bits, "w")
    assert set(candidates) == {"dense", "mask", "rel8", "rel4"}
    decoded = {}
    for enc, streams in candidates.items():
        coded = {k: code_stream(t, lzma_too=True) for k, t in streams.items()}
        entry = {"dtype": "float32", "shape": list(shape), "encoding": enc, "entries": entries[enc],
                 "streams": {k: [s.codec, s.numel] for k, s in coded.items()}}
        decoded[enc] = decode_weight(entry, {k: s.data for k, s in coded.items()}, bits)
        assert decoded[enc].shape == w.shape
    for enc in decoded:
        assert torch.equal(decoded[enc], decoded["dense"]), enc
    if bits is None:
        assert torch.equal(decoded["dense"], w)


def test_relative_index_fillers_bridge_long_gaps(tmp_path):
    model = nn.Linear(2000, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[0, [3, 700, 1999]] = torch.tensor([1.5, -2.0, 0.25])
    candidates, entries, _ = encodings.candidates(model.weight, None, "weight")
    # gaps of 3, 696 and 1298 zeros: 0 + 2 + 5 fillers of 255 (rel8), 0 + 43 + 81 fillers of 15 (rel4)
    assert entries["rel8"] == 3 + 7 and entries["rel4"] == 3 + 124
    assert candidates["rel8"]["index"].tolist() == [3, 255, 255, 184, 255, 255, 255, 255, 255, 18]
    assert candidates["rel8"]["values"].tolist() == [1.5, 0, 0, -2.0, 0, 0, 0, 0, 0, 0.25]
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = nn.Linear(2000, 1, bias=False)
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "batchnorm"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_quantized_round_trip_within_half_a_step(tmp_path, kind, bits, sparsity):
    model = sparsify_(build(kind), sparsity)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=bits)
    fresh = build(kind, seed=9)
    load_compressed(fresh, tmp_path / "m.safetensors")
    loaded, qmax = fresh.state_dict(), 2 ** (bits - 1) - 1
    for row in report.tensors:
        orig, new = model.state_dict()[row.name], loaded[row.name]
        assert new.dtype == orig.dtype and new.shape == orig.shape
        if row.encoding == "raw":
            assert torch.equal(new, orig), row.name
            continue
        rows_o, rows_n = orig.reshape(orig.shape[0], -1), new.reshape(orig.shape[0], -1)
        scale = (rows_o.abs().amax(dim=1) / qmax).float()
        bound = scale[:, None] / 2 * (1 + 1e-6) + rows_o.abs() * 2.0**-23
        assert bool(((rows_n - rows_o).abs() <= bound).all()), row.name
        assert bool((new[orig == 0] == 0).all()), f"{row.name}: a zero became a non-zero"
        assert row.quantized_to_zero == int(((orig != 0) & (new == 0)).sum())


def test_quantization_refuses_non_finite_weights(tmp_path):
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite.*bits=None"):
        save_compressed(model, tmp_path / "m.safetensors", bits=8)


class Constant(Encoding):
    """A toy encoding: one value for a weight whose values are all equal, every value otherwise."""

    name = "test-constant"

    def encode(self, weight: WeightValues) -> tuple[dict[str, torch.Tensor], int]:
        v = weight.values
        if v.numel() and bool((v == v[0]).all()):
            return {"values": weight.pack(v[:1])}, 1
        return {"values": weight.pack(v)}, v.numel()

    def decode(self, stored: StoredWeight) -> torch.Tensor:
        n = int(stored.entry["entries"])
        return stored.values(n).expand(stored.numel).clone() if n == 1 else stored.values(stored.numel)


@pytest.fixture
def constant():
    register_encoding(Constant)
    yield Constant.name
    encodings.ENCODINGS.pop(Constant.name, None)


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_registered_encoding_is_chosen_when_smallest_and_round_trips(tmp_path, constant, bits):
    """A new encoding needs only its class and the decorator: it is a candidate, wins where smallest, and loads."""
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.fill_(0.5)
    assert list(encodings.candidates(model[0].weight, bits, "w")[0]) == ["dense", "mask", "rel8", "rel4", constant]
    assert encode_weight(model[1].weight, bits, "w").encoding != constant  # as big as `dense`: the tie goes to dense
    report = save_compressed(model, tmp_path / "m.safetensors", bits=bits)
    rows = {t.name: t for t in report.tensors}
    assert rows["0.weight"].encoding == constant and rows["1.weight"].encoding != constant
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        manifest = {e["name"]: e for e in json.loads(f.metadata()["manifest"])}
    assert manifest["0.weight"]["encoding"] == constant and manifest["0.weight"]["entries"] == 1
    fresh = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    load_compressed(fresh, tmp_path / "m.safetensors")
    assert torch.equal(fresh[0].weight, model[0].weight)
    if bits is None:
        assert_same_state(fresh, model.state_dict())
    unregister_encoding(constant)  # a reader without the encoding refuses the file, naming it
    with pytest.raises(DWFFileError, match=f"unknown encoding '{constant}'"):
        load_compressed(nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)), tmp_path / "m.safetensors")
    again = save_compressed(model, tmp_path / "without.safetensors", bits=bits)  # the writer is back to the built-ins
    assert again.tensors[0].name == "0.weight" and again.tensors[0].encoding in ("dense", "mask", "rel8", "rel4")


def test_registry_refuses_duplicate_and_reserved_names():
    with pytest.raises(ValueError, match="already registered"):
        register_encoding(type("Again", (Encoding,), {"name": "dense"}))
    with pytest.raises(ValueError, match="reserved"):
        register_encoding(type("Raw", (Encoding,), {"name": "raw"}))
    assert list(encodings.ENCODINGS) == ["dense", "mask", "rel8", "rel4"]
