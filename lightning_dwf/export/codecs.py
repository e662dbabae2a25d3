"""Byte-level codecs of the compressed format: tensor bytes, byte shuffle, deflate/lzma streams, nibbles, gaps.

Nothing here knows about weights or files: these are the reversible byte transforms the weight encodings
(:mod:`lightning_dwf.export.encodings`) and the file format (:mod:`lightning_dwf.export.format`) are built from.
Every decoder raises ValueError on input it cannot have produced, so a damaged file is an error, never wrong values.
"""

from __future__ import annotations

import lzma
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: lzma's raw (headerless) stream settings; a file stores no lzma header, so the decoder must use the same ones.
LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


def as_bytes(t: Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor (any dtype, any number of dims)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def from_bytes(data: bytes, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`as_bytes` for a 1-D tensor; raises ValueError if the length does not fit ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize:
        raise ValueError(f"a stream of {len(data)} bytes is not a whole number of {dtype} elements")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)


def shuffle(data: bytes, itemsize: int) -> bytes:
    """Byte-plane shuffle: all first bytes of the elements, then all second bytes… (helps entropy coders on floats)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle(data: bytes, itemsize: int) -> bytes:
    """Inverse of :func:`shuffle`."""
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def deflate(data: bytes) -> bytes:
    """Raw deflate at level 6: no zlib header (the file has its own checksum); level 9 is ~20x slower on zeros."""
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


#: Entropy coders by the name a file records (after an optional ``shuffle+`` prefix).
COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "deflate": deflate,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS),
}
DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "deflate": lambda data: zlib.decompress(data, -15),
    "lzma": lambda data: lzma.decompress(data, format=lzma.FORMAT_RAW, filters=LZMA_FILTERS),
}


@dataclass(frozen=True)
class Stream:
    """One stored stream: ``data`` is what goes into the file (the tensor itself when ``codec == "none"``).

    Attributes:
        data: the stored tensor (uint8 when coded). codec: ``none``, ``deflate``, ``lzma``, ``shuffle+…``.
        numel: elements of the decoded stream.
    """

    data: Tensor
    codec: str
    numel: int

    @property
    def nbytes(self) -> int:
        """Bytes of ``data`` in the file: the cost an encoding is chosen by."""
        return self.data.numel() * self.data.element_size()


def code_stream(t: Tensor, lzma_too: bool = False) -> Stream:
    """The smallest of ``t`` as-is and ``t`` deflated (with and without byte shuffle).

    With ``lzma_too`` lzma is also tried, on the input (shuffled or not) that deflated best and only if deflate
    paid at all: lzma is ~15x slower than deflate and on these streams gains at most ~10 % over it.
    """
    t = t.detach().cpu().contiguous().reshape(-1)
    best = Stream(t, "none", t.numel())
    if t.numel() == 0:
        return best
    raw = as_bytes(t)
    inputs = {"": raw}
    if t.element_size() > 1:
        inputs["shuffle+"] = shuffle(raw, t.element_size())
    best_input = None
    for prefix, data in inputs.items():
        coded = deflate(data)
        if len(coded) < best.nbytes:
            best = Stream(torch.frombuffer(bytearray(coded), dtype=torch.uint8), prefix + "deflate", t.numel())
            best_input = prefix
    if lzma_too and best_input is not None:
        coded = COMPRESS["lzma"](inputs[best_input])
        if len(coded) < best.nbytes:
            best = Stream(torch.frombuffer(bytearray(coded), dtype=torch.uint8), best_input + "lzma", t.numel())
    return best


def decode_stream(stored: Tensor, codec: str, numel: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`code_stream`: ``numel`` elements of ``dtype``; raises ValueError on any inconsistency."""
    if codec == "none":
        if stored.dtype != dtype or stored.numel() != numel:
            raise ValueError(f"expected {numel} {dtype} elements, found {stored.numel()} {stored.dtype}")
        return stored.reshape(-1)
    shuffled, _, name = codec.rpartition("+")
    if name not in DECOMPRESS or shuffled not in ("", "shuffle") or stored.dtype != torch.uint8:
        raise ValueError(f"unknown codec {codec!r} or stored dtype {stored.dtype}")
    data = DECOMPRESS[name](as_bytes(stored))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise ValueError(f"decompressed {len(data)} bytes, expected {numel} × {itemsize}")
    if shuffled:
        data = unshuffle(data, itemsize)
    return from_bytes(data, dtype)


def pack_nibbles(q: Tensor) -> Tensor:
    """Integers in [-8, 7] → uint8, two's-complement nibbles, element 2i in the low nibble of byte i."""
    n = q.numel()
    u = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if n % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    """Inverse of :func:`pack_nibbles`: ``n`` int8 values in [-8, 7]; raises ValueError if the length is wrong."""
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} nibbles")
    u = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int8)
    return torch.where(u > 7, u - 16, u)


def relative_index(positions: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression's relative indices of sorted flat ``positions``.

    Returns ``(gaps, real)``: per stored entry the zeros skipped since the previous entry (<= ``max_gap``), and
    whether the entry is a real non-zero (False: a zero-valued filler bridging a longer gap).
    """
    skipped = np.diff(positions, prepend=-1) - 1
    fillers = skipped // (max_gap + 1)
    counts = fillers + 1
    ends = np.cumsum(counts) - 1
    gaps = np.full(int(counts.sum()), max_gap, dtype=np.int64)
    gaps[ends] = skipped - fillers * (max_gap + 1)
    real = np.zeros(gaps.size, dtype=bool)
    real[ends] = True
    return gaps, real


def positions_from_gaps(gaps: np.ndarray) -> np.ndarray:
    """Inverse of :func:`relative_index`: the flat position of every stored entry (fillers included)."""
    return np.cumsum(gaps.astype(np.int64) + 1) - 1
