"""The weight encodings, one class each, registered by name; a weight is stored with the smallest of them.

A weight (floating point, >= 2 dims) is first reduced to its values (:func:`~lightning_dwf.export.values.weight_values`:
the weight itself, or per-row integer codes with ``bits``; int8 for ``bits=8``, nibbles packed two per byte, low
nibble first, for ``bits=4``). Every registered :class:`Encoding` turns the values into named streams;
:func:`encode_weight` keeps the one whose streams are smallest after entropy coding, and the file records its
``name``, which :func:`decode_weight` looks up. The built-in encodings, in candidate order:

* ``dense``: ``values`` holds every element (no pattern; best at low sparsity);
* ``mask``: a 1-bit-per-element packed ``mask`` (little bit order, row-major) and the non-zeros as ``values``;
* ``rel8`` / ``rel4``: Deep Compression's relative indices: ``index`` holds, per stored entry, the zeros skipped
  since the previous entry (uint8, or 4 bits packed two per byte) and ``values`` the entries; a gap longer than
  255 (15) is bridged by filler entries with value zero.

A new encoding is a subclass of :class:`Encoding` with :func:`register_encoding` on it; nothing else changes. It must
be exact on the values (the dispatcher compares sizes only) and must not name a stream ``scales``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, NamedTuple, TypeVar

import numpy as np
import torch
from torch import Tensor

from lightning_dwf._validation import check_bits
from lightning_dwf.export.codecs import (
    Stream,
    code_stream,
    pack_nibbles,
    positions_from_gaps,
    relative_index,
    unpack_nibbles,
)
from lightning_dwf.export.values import StoredWeight, WeightValues, weight_values


class Encoding(ABC):
    """One way to store a weight's values as named streams; subclass it and decorate with :func:`register_encoding`.

    Attributes:
        name: recorded in the file; :func:`decode_weight` finds the encoding by it.
    """

    name: ClassVar[str] = ""

    @abstractmethod
    def encode(self, weight: WeightValues) -> tuple[dict[str, Tensor], int]:
        """``({stream: tensor}, entries)``: the uncoded streams and the number of stored values."""

    @abstractmethod
    def decode(self, stored: StoredWeight) -> Tensor:
        """Inverse of :meth:`encode`: the ``stored.numel`` values, flat; raises ValueError on any inconsistency."""


#: The registered encodings by name; their order is the candidate order (a tie goes to the earlier one).
ENCODINGS: dict[str, Encoding] = {}
_E = TypeVar("_E", bound=type[Encoding])


def register_encoding(cls: _E) -> _E:
    """Class decorator: register an instance of ``cls`` under ``cls.name`` as the last candidate.

    Raises:
        ValueError: the name is empty, ``"raw"`` (the format's own) or already registered.
    """
    if not cls.name or cls.name == "raw" or cls.name in ENCODINGS:
        raise ValueError(f"cannot register encoding {cls.name!r}: empty, reserved or already registered.")
    ENCODINGS[cls.name] = cls()
    return cls


def unregister_encoding(name: str) -> None:
    """Remove encoding ``name`` (files that use it can no longer be read); raises KeyError if unknown."""
    del ENCODINGS[name]


@register_encoding
class Dense(Encoding):
    """Every value, no pattern: the smallest at low sparsity."""

    name = "dense"

    def encode(self, weight: WeightValues) -> tuple[dict[str, Tensor], int]:
        return {"values": weight.pack(weight.values)}, weight.values.numel()

    def decode(self, stored: StoredWeight) -> Tensor:
        return stored.values(stored.numel)


@register_encoding
class Mask(Encoding):
    """A packed 1-bit mask over every element plus the non-zeros: wins where the pattern is dense."""

    name = "mask"

    def encode(self, weight: WeightValues) -> tuple[dict[str, Tensor], int]:
        mask = np.packbits(weight.keep.numpy(), bitorder="little")
        return {"mask": torch.from_numpy(mask), "values": weight.pack(weight.kept)}, weight.positions.size

    def decode(self, stored: StoredWeight) -> Tensor:
        mask = stored.stream("mask", torch.uint8).numpy()
        if mask.size != (stored.numel + 7) // 8:
            raise ValueError(f"a mask of {mask.size} bytes for {stored.numel} elements")
        return stored.scatter(np.flatnonzero(np.unpackbits(mask, count=stored.numel, bitorder="little")))


class RelativeIndex(Encoding):
    """Deep Compression's relative indices with gaps of at most ``max_gap`` (zero fillers bridge longer ones)."""

    max_gap: ClassVar[int]

    def pack_index(self, gaps: Tensor) -> Tensor:
        """The ``index`` stream of uint8 ``gaps``."""
        return gaps

    def unpack_index(self, index: Tensor, entries: int) -> Tensor:
        """Inverse of :meth:`pack_index`."""
        return index

    def encode(self, weight: WeightValues) -> tuple[dict[str, Tensor], int]:
        gaps, real = relative_index(weight.positions, self.max_gap)
        stored = weight.values.new_zeros(gaps.size)
        stored[torch.from_numpy(real)] = weight.kept
        index = self.pack_index(torch.from_numpy(gaps.astype(np.uint8)))
        return {"index": index, "values": weight.pack(stored)}, gaps.size

    def decode(self, stored: StoredWeight) -> Tensor:
        gaps = self.unpack_index(stored.stream("index", torch.uint8), int(stored.entry["entries"]))
        positions = positions_from_gaps(gaps.numpy())
        if positions.size and positions[-1] >= stored.numel:
            raise ValueError(f"relative indices run past the tensor's {stored.numel} elements")
        return stored.scatter(positions)


@register_encoding
class Rel8(RelativeIndex):
    """Relative indices, one byte per gap (<= 255)."""

    name = "rel8"
    max_gap = 255


@register_encoding
class Rel4(RelativeIndex):
    """Relative indices, 4 bits per gap (<= 15), two gaps per byte."""

    name = "rel4"
    max_gap = 15

    def pack_index(self, gaps: Tensor) -> Tensor:
        return pack_nibbles(gaps)

    def unpack_index(self, index: Tensor, entries: int) -> Tensor:
        return unpack_nibbles(index, entries) & 0xF


def candidates(weight: Tensor, bits: int | None, name: str) -> tuple[dict[str, dict[str, Tensor]], dict[str, int], int]:
    """Every registered encoding of a weight, uncoded: ``({encoding: {stream: tensor}}, {encoding: entries},
    quantized_to_zero)``; ``scales`` is appended to each encoding's streams when ``bits`` is set."""
    w = weight_values(weight, bits, name)
    extra = {} if w.scales is None else {"scales": w.scales}
    streams: dict[str, dict[str, Tensor]] = {}
    entries: dict[str, int] = {}
    for enc, encoding in ENCODINGS.items():
        own, entries[enc] = encoding.encode(w)
        streams[enc] = {**own, **extra}
    return streams, entries, w.quantized_to_zero


class EncodedWeight(NamedTuple):
    """The chosen encoding of a weight: its name, its coded streams, stored values and non-zeros quantized to 0."""

    encoding: str
    streams: dict[str, Stream]
    entries: int
    quantized_to_zero: int


def encode_weight(weight: Tensor, bits: int | None, name: str) -> EncodedWeight:
    """The smallest registered encoding of a weight, its streams entropy-coded.

    Every candidate's streams are costed with deflate (fast); lzma is then tried on the winner's streams only. A tie
    goes to the encoding registered first (the simplest).

    Raises:
        ValueError: ``bits`` is not None, 8 or 4; with ``bits``, the weight is not finite or has no float32 scale.
    """
    bits = check_bits(bits, "bits")
    streams, entries, dropped = candidates(weight, bits, name)
    coded = {enc: {k: code_stream(t) for k, t in s.items()} for enc, s in streams.items()}
    cost = {enc: sum(s.nbytes for s in c.values()) for enc, c in coded.items()}
    enc = min(cost, key=lambda e: (cost[e], list(cost).index(e)))
    best = {k: code_stream(t, lzma_too=True) for k, t in streams[enc].items()}  # lzma only on the winner
    return EncodedWeight(enc, best, entries[enc], dropped)


def decode_weight(entry: Mapping[str, Any], streams: Mapping[str, Tensor], bits: int | None) -> Tensor:
    """Inverse of :func:`encode_weight`: the weight of manifest ``entry`` from its stored ``streams``.

    Raises:
        ValueError: an unknown encoding or dtype, or streams that do not fit the entry.
    """
    stored = StoredWeight(entry, streams, bits)
    encoding = ENCODINGS.get(entry["encoding"])
    if encoding is None:
        raise ValueError(f"unknown encoding {entry['encoding']!r}")
    flat = encoding.decode(stored)
    if bits is not None:
        scales = stored.stream("scales", torch.float32)
        if scales.numel() != stored.shape[0]:
            raise ValueError(f"{scales.numel()} scales for {stored.shape[0]} rows")
        compute = torch.promote_types(stored.dtype, torch.float32)
        flat = (flat.reshape(stored.shape[0], -1).to(compute) * scales.to(compute)[:, None]).to(stored.dtype)
    return flat.reshape(stored.shape).clone()
