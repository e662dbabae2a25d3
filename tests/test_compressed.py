"""The compressed model file: bit-exact / quantized round trips, mismatch and corruption errors, sizes on disk."""

from __future__ import annotations

import copy
import io
import json
import os
import random
import struct
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lightning_dwf import factorize_
from lightning_dwf.export.compressed import (
    CompressionReport,
    _candidates,
    _code_stream,
    _decode_weight,
    load_compressed,
    save_compressed,
)

KINDS = ["linear", "conv1d", "conv2d", "conv3d", "batchnorm"]
SPARSITIES = [0.0, 0.5, 0.9, 0.99, 1.0]


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        model = nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 4))
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 8, 5), nn.ReLU(), nn.Conv1d(8, 4, 3))
    elif kind == "conv2d":
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False))
    elif kind == "conv3d":
        model = nn.Sequential(nn.Conv3d(2, 4, 3), nn.ReLU(), nn.Conv3d(4, 2, 1))
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8, 4),
                              nn.BatchNorm1d(4))
        model.register_buffer("flags", torch.tensor([True, False, True]))
    return model


def sparsify_(model: nn.Module, sparsity: float, seed: int = 1) -> nn.Module:
    """Random state (incl. BN statistics) with each >= 2-D weight magnitude-pruned to ``sparsity``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                value = torch.randn(t.shape, generator=g)
                t.copy_(value.abs() if "running_var" in name else value)
                if t.dim() >= 2:
                    keep = round(t.numel() * (1 - sparsity))
                    flat = t.view(-1)
                    order = flat.abs().argsort(descending=True)
                    flat[order[keep:]] = 0.0
            elif name.endswith("num_batches_tracked"):
                t.fill_(7)
    return model


def lenet(sparsity: float, seed: int = 0) -> nn.Module:
    """LeNet-300-100 (784-300-100-10, biases) with N(0, 1) weights pruned to ``sparsity`` by global magnitude."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    weights = [m.weight for m in model if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for w in weights:
            w.normal_()
        magnitudes = torch.cat([w.abs().flatten() for w in weights])
        threshold = magnitudes.topk(round(magnitudes.numel() * (1 - sparsity))).values.min()
        for w in weights:
            w.masked_fill_(w.abs() < threshold, 0.0)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert now[k].dtype == v.dtype and torch.equal(now[k], v), k


@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("kind", KINDS)
def test_lossless_round_trip_is_bit_exact(tmp_path, kind, sparsity):
    model = sparsify_(build(kind), sparsity)
    report = save_compressed(model, tmp_path / "m.safetensors")
    fresh = build(kind, seed=123)
    assert load_compressed(tmp_path / "m.safetensors", fresh) is fresh
    assert_same_state(fresh, model.state_dict())
    assert report.file_bytes == os.path.getsize(tmp_path / "m.safetensors")
    assert [t.name for t in report.tensors] == list(model.state_dict())
    assert all(t.encoding == "raw" for t in report.tensors if t.name.endswith(("bias", "running_mean", "tracked")))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_lossless_keeps_other_float_dtypes(tmp_path, dtype):
    model = sparsify_(build("batchnorm"), 0.9).to(dtype)
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = build("batchnorm", seed=5).to(dtype)
    load_compressed(tmp_path / "m.safetensors", fresh)
    assert_same_state(fresh, model.state_dict())


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("shape", [(3, 700), (2, 5, 7), (1, 1), (4, 0)])
@pytest.mark.parametrize("sparsity", [0.0, 0.7, 0.995, 1.0])
def test_every_encoding_decodes(shape, sparsity, bits):
    """Each candidate (dense, mask, rel8 with fillers, rel4 with fillers) decodes to the same tensor."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) >= sparsity)
    candidates, entries, _ = _candidates(w, bits, "w")
    assert set(candidates) == {"dense", "mask", "rel8", "rel4"}
    decoded = {}
    for enc, streams in candidates.items():
        coded = {k: _code_stream(t, lzma_too=True) for k, t in streams.items()}
        entry = {"dtype": "float32", "shape": list(shape), "encoding": enc, "entries": entries[enc],
                 "streams": {k: [s.codec, s.numel] for k, s in coded.items()}}
        decoded[enc] = _decode_weight(entry, {k: s.data for k, s in coded.items()}, bits)
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
    candidates, entries, _ = _candidates(model.weight, None, "weight")
    # gaps of 3, 696 and 1298 zeros: 0 + 2 + 5 fillers of 255 (rel8), 0 + 43 + 81 fillers of 15 (rel4)
    assert entries["rel8"] == 3 + 7 and entries["rel4"] == 3 + 124
    assert candidates["rel8"]["index"].tolist() == [3, 255, 255, 184, 255, 255, 255, 255, 255, 18]
    assert candidates["rel8"]["values"].tolist() == [1.5, 0, 0, -2.0, 0, 0, 0, 0, 0, 0.25]
    save_compressed(model, tmp_path / "m.safetensors")
    fresh = nn.Linear(2000, 1, bias=False)
    load_compressed(tmp_path / "m.safetensors", fresh)
    assert torch.equal(fresh.weight, model.weight)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["linear", "conv2d", "batchnorm"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9])
def test_quantized_round_trip_within_half_a_step(tmp_path, kind, bits, sparsity):
    model = sparsify_(build(kind), sparsity)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=bits)
    fresh = build(kind, seed=9)
    load_compressed(tmp_path / "m.safetensors", fresh)
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
        load_compressed(tmp_path / "m.safetensors", module)
    assert_same_state(module, before)


@pytest.fixture
def saved(tmp_path):
    model = sparsify_(build("batchnorm"), 0.9)
    path = tmp_path / "m.safetensors"
    save_compressed(model, path, bits=8)
    return model, path, path.read_bytes()


def _rejects(path, data: bytes, match: str = "") -> None:
    path.write_bytes(data)
    module = build("batchnorm", seed=3)
    before = snapshot(module)
    with pytest.raises(ValueError, match=match) as info:
        load_compressed(path, module)
    assert str(path) in str(info.value)
    assert_same_state(module, before)


def test_truncated_files_are_rejected(saved, tmp_path):
    _, _, data = saved
    header = 8 + struct.unpack("<Q", data[:8])[0]
    for cut in sorted({0, 1, 7, 8, 30, header // 2, header - 1, header, header + 1, (header + len(data)) // 2,
                       len(data) - 1}):
        _rejects(tmp_path / f"cut{cut}.safetensors", data[:cut], "not a readable safetensors file|checksum|corrupt")


def test_random_bytes_are_rejected(tmp_path):
    rng = random.Random(0)
    for n in (0, 5, 100, 5000):
        _rejects(tmp_path / f"r{n}.safetensors", rng.randbytes(n), "not a readable safetensors file")


def test_every_flipped_payload_byte_is_detected(saved, tmp_path):
    _, _, data = saved
    header = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "flip.safetensors"
    for i in range(header, len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x01
        _rejects(path, bytes(flipped), "checksum")


def test_flipped_header_bytes_never_give_wrong_weights(saved, tmp_path):
    """A flip in the JSON header is an error, or (e.g. in padding) changes nothing that is loaded."""
    model, _, data = saved
    reference = build("batchnorm", seed=3)
    load_compressed(saved[1], reference)
    header = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "flip.safetensors"
    for i in range(0, header, 3):
        flipped = bytearray(data)
        flipped[i] ^= 0x20
        path.write_bytes(bytes(flipped))
        module = build("batchnorm", seed=3)
        try:
            load_compressed(path, module)
        except ValueError:
            continue
        assert_same_state(module, reference.state_dict())


def _rewrite(path, out, **metadata: str) -> None:
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = {**f.metadata(), **metadata}
    save_file(tensors, str(out), metadata=meta)


def test_wrong_format_version_is_rejected(saved, tmp_path):
    _, path, _ = saved
    _rewrite(path, tmp_path / "v2.safetensors", format_version="2")
    _rejects(tmp_path / "v2.safetensors", (tmp_path / "v2.safetensors").read_bytes(),
             "format version '2', but this lightning-dwf reads version '1'")


def test_edited_metadata_fails_the_checksum(saved, tmp_path):
    _, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        manifest = json.loads(f.metadata()["manifest"])
    manifest[0]["shape"] = [8, 3, 3, 3]
    for i, edit in enumerate([{"bits": "4"}, {"manifest": json.dumps(manifest)}]):
        _rewrite(path, tmp_path / f"e{i}.safetensors", **edit)
        _rejects(tmp_path / f"e{i}.safetensors", (tmp_path / f"e{i}.safetensors").read_bytes(), "checksum")


def test_plain_safetensors_file_is_not_this_format(tmp_path):
    save_file(build("batchnorm").state_dict(), str(tmp_path / "plain.safetensors"))
    _rejects(tmp_path / "plain.safetensors", (tmp_path / "plain.safetensors").read_bytes(), "not a lightning-dwf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="No compressed model file"):
        load_compressed(tmp_path / "nope.safetensors", build("linear"))


def test_factorized_module_is_refused(tmp_path):
    model = build("linear")
    factorize_(model, depth=3)
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        save_compressed(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()
    save_compressed(build("linear"), tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        load_compressed(tmp_path / "plain.safetensors", model)


def test_report_sizes_and_table(tmp_path):
    model = sparsify_(build("batchnorm"), 0.5)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=8)
    assert isinstance(report, CompressionReport)
    rows = {t.name: t for t in report.tensors}
    conv = rows["0.weight"]
    assert conv.numel == 8 * 3 * 3 * 3 and conv.dense_bytes == conv.numel * 4
    assert conv.csr_bytes == conv.nonzero * 8 + (8 + 1) * 4
    assert rows["1.num_batches_tracked"].dense_bytes == 8 and rows["flags"].dense_bytes == 3
    assert report.dense_bytes == sum(t.dense_bytes for t in report.tensors)
    assert report.ratio == pytest.approx(report.dense_bytes / os.path.getsize(tmp_path / "m.safetensors"))
    assert report.header_bytes > 0
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "1" and meta["bits"] == "8" and meta["tool_version"]
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(report.table())
    text = console.export_text()
    assert "0.weight" in text and "header" in text and "file" in text


@pytest.mark.parametrize(("bits", "min_ratio"), [(None, None), (8, 40.0), (4, 60.0)])
def test_lenet_300_100_at_98_percent_sizes_on_disk(tmp_path, bits, min_ratio):
    model = lenet(0.98)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=bits)
    assert report.dense_bytes == (784 * 300 + 300 * 100 + 100 * 10 + 300 + 100 + 10) * 4
    print(f"\nLeNet-300-100 98 % bits={bits}: dense {report.dense_bytes} B, CSR {report.csr_bytes} B, "
          f"file {report.file_bytes} B, dense/file {report.ratio:.1f}x, CSR/file {report.csr_ratio:.2f}x")
    if min_ratio is None:
        assert report.file_bytes < report.csr_bytes
        fresh = lenet(0.5, seed=1)
        load_compressed(tmp_path / "m.safetensors", fresh)
        assert_same_state(fresh, model.state_dict())
    else:
        assert report.ratio >= min_ratio


def test_save_does_not_change_the_module(tmp_path):
    model = sparsify_(build("batchnorm"), 0.9)
    before = snapshot(model)
    save_compressed(model, tmp_path / "m.safetensors", bits=4)
    assert_same_state(model, before)
    assert type(copy.deepcopy(model)[0]) is nn.Conv2d
