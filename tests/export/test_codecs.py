"""The byte-level codecs: every transform inverts, coding never grows a stream, and bad input is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_dwf.export.codecs import (
    as_bytes,
    code_stream,
    decode_stream,
    from_bytes,
    pack_nibbles,
    positions_from_gaps,
    relative_index,
    shuffle,
    unpack_nibbles,
    unshuffle,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64]


def _stream(dtype: torch.dtype, n: int, zeros: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    t = torch.randn(n, generator=g) * 50 * (torch.rand(n, generator=g) >= zeros)
    return t.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n", "zeros"), [(0, 0.0), (1, 0.0), (7, 0.5), (1000, 0.0), (1000, 0.98)])
@pytest.mark.parametrize("lzma_too", [False, True])
def test_code_stream_round_trips_and_never_grows(dtype, n, zeros, lzma_too):
    t = _stream(dtype, n, zeros)
    s = code_stream(t, lzma_too=lzma_too)
    assert s.nbytes <= t.numel() * t.element_size() and s.numel == n
    assert s.codec == "none" or s.data.dtype == torch.uint8
    assert torch.equal(decode_stream(s.data, s.codec, s.numel, dtype), t)


def test_mostly_zero_streams_are_coded():
    t = _stream(torch.float32, 4000, 0.99)
    assert code_stream(t).codec.endswith("deflate")
    assert code_stream(t, lzma_too=True).codec.rpartition("+")[2] in ("deflate", "lzma")


@pytest.mark.parametrize(
    ("stored", "codec", "numel", "dtype", "message"),
    [
        (torch.zeros(4), "none", 5, torch.float32, "expected 5"),
        (torch.zeros(4), "none", 4, torch.float64, "expected 4"),
        (torch.zeros(4, dtype=torch.uint8), "zstd", 4, torch.uint8, "unknown codec"),
        (torch.zeros(4, dtype=torch.uint8), "bitshuffle+deflate", 4, torch.uint8, "unknown codec"),
        (torch.zeros(4), "deflate", 4, torch.float32, "unknown codec"),
    ],
)
def test_decode_stream_refuses_inconsistent_input(stored, codec, numel, dtype, message):
    with pytest.raises(ValueError, match=message):
        decode_stream(stored, codec, numel, dtype)


def test_decoded_length_is_checked():
    s = code_stream(torch.zeros(1000))
    with pytest.raises(ValueError, match="decompressed 4000 bytes, expected 999"):
        decode_stream(s.data, s.codec, 999, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bytes_and_shuffle_invert(dtype):
    t = _stream(dtype, 33, 0.3)
    raw = as_bytes(t)
    assert len(raw) == t.numel() * t.element_size()
    assert torch.equal(from_bytes(raw, dtype), t)
    assert unshuffle(shuffle(raw, t.element_size()), t.element_size()) == raw
    if t.element_size() > 1:
        with pytest.raises(ValueError, match="not a whole number"):
            from_bytes(raw[:-1], dtype)


@pytest.mark.parametrize("n", [0, 1, 2, 9, 64])
def test_nibbles_invert(n):
    q = torch.arange(n, dtype=torch.int8) % 16 - 8
    packed = pack_nibbles(q)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_nibbles(packed, n), q)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_nibbles(packed, n + 2)


@pytest.mark.parametrize("max_gap", [255, 15])
def test_relative_index_inverts_with_fillers(max_gap):
    positions = np.array([0, 3, 4, 40, 700, 1999], dtype=np.int64)
    gaps, real = relative_index(positions, max_gap)
    assert gaps.max() <= max_gap and real.sum() == positions.size
    assert np.array_equal(positions_from_gaps(gaps)[real], positions)
    assert np.array_equal(relative_index(np.array([], dtype=np.int64), max_gap)[0], np.array([], dtype=np.int64))
