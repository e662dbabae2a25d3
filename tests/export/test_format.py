"""The file format: truncated, random, flipped, re-versioned, edited and foreign files are refused."""

from __future__ import annotations

import json
import random
import struct

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from lightning_dwf.export import FORMAT, FORMAT_VERSION, load_compressed, save_compressed
from lightning_dwf.export.format import RESERVED_KEYS, checksum, dtype_from_name, dtype_name

from .helpers import assert_same_state, build, snapshot, sparsify_


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
        load_compressed(module, path)
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
    load_compressed(reference, saved[1])
    header = 8 + struct.unpack("<Q", data[:8])[0]
    path = tmp_path / "flip.safetensors"
    for i in range(0, header, 3):
        flipped = bytearray(data)
        flipped[i] ^= 0x20
        path.write_bytes(bytes(flipped))
        module = build("batchnorm", seed=3)
        try:
            load_compressed(module, path)
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


def test_header_keys_and_checksum(saved):
    """The header holds exactly the format's keys, and its sha256 is the one :func:`checksum` computes."""
    _, path, _ = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(meta) == set(RESERVED_KEYS)
    assert (meta["format"], meta["format_version"]) == (FORMAT, FORMAT_VERSION)
    assert meta["sha256"] == checksum(meta, tensors)
    assert checksum({**meta, "bits": "4"}, tensors) != meta["sha256"]


@pytest.mark.parametrize("name", ["float32", "bfloat16", "int64", "bool", "uint8"])
def test_dtype_names_round_trip(name):
    assert dtype_name(dtype_from_name(name)) == name


@pytest.mark.parametrize("name", ["nope", "Tensor", "nn"])
def test_unknown_dtype_name_is_refused(name):
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_from_name(name)
