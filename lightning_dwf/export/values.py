"""A weight's values as the encodings see them: quantized on the export grid, and read back from stored streams.

:func:`weight_values` reduces a weight to the flat values every encoding stores: the weight itself when
``bits is None`` (exact), else symmetric per-output-row integers ``q = clamp(round(w / scale_r), ±(2**(bits-1) - 1))``
with ``scale_r = max_j |w_rj| / (2**(bits-1) - 1)`` as float32 ``scales``. :class:`StoredWeight` is the reverse side:
the streams of one weight in a file, with the helpers a decoder needs. Kept apart from the encodings so that a new
encoding only deals with values and patterns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_dwf.core.functional import grid_codes
from lightning_dwf.export.codecs import decode_stream, pack_nibbles, unpack_nibbles
from lightning_dwf.export.format import dtype_from_name


@dataclass(frozen=True)
class WeightValues:
    """A weight reduced to what encodings store, flat and row-major (see the module docstring).

    Attributes:
        values: every element: the weight itself (``bits=None``) or its int8 codes. bits: None, 8 or 4.
        keep: ``values != 0`` (NaN is kept, ``-0.0`` is a zero). positions: flat indices of ``keep`` (int64).
        kept: ``values`` at ``positions``. scales: float32 per-row scales, None when ``bits is None``.
        quantized_to_zero: non-zeros of the weight whose code is 0 (they load as exact zeros).
    """

    values: Tensor
    bits: int | None
    keep: Tensor
    positions: np.ndarray
    kept: Tensor
    scales: Tensor | None
    quantized_to_zero: int

    def pack(self, v: Tensor) -> Tensor:
        """Values as stored: two per byte when ``bits == 4``, else unchanged."""
        return pack_nibbles(v) if self.bits == 4 else v


class StoredWeight:
    """The streams of one weight read from a file, with the helpers an :meth:`Encoding.decode` needs.

    Attributes:
        entry: the weight's manifest entry. bits: the file's ``bits``. dtype / shape / numel: the weight's.
    """

    def __init__(self, entry: Mapping[str, Any], streams: Mapping[str, Tensor], bits: int | None) -> None:
        self.entry, self.bits, self._streams = entry, bits, streams
        self.dtype, self.shape = dtype_from_name(entry["dtype"]), tuple(entry["shape"])
        self.numel = int(np.prod(self.shape, dtype=np.int64))

    def stream(self, key: str, dtype: torch.dtype) -> Tensor:
        """Stream ``key`` decoded to a flat tensor of ``dtype``; raises ValueError on any inconsistency."""
        codec, n = self.entry["streams"][key]
        return decode_stream(self._streams[key], codec, int(n), dtype)

    def values(self, n: int) -> Tensor:
        """The ``values`` stream as ``n`` values (the weight's dtype, or int8 codes); ValueError if not ``n``."""
        if self.bits is None:
            v = self.stream("values", self.dtype)
        elif self.bits == 8:
            v = self.stream("values", torch.int8)
        else:
            v = unpack_nibbles(self.stream("values", torch.uint8), n)
        if v.numel() != n:
            raise ValueError(f"{v.numel()} values for {n} entries")
        return v

    def scatter(self, positions: np.ndarray) -> Tensor:
        """All ``numel`` values: zeros, with the ``values`` stream at the flat ``positions``."""
        v = self.values(positions.size)
        flat = v.new_zeros(self.numel)
        flat[torch.from_numpy(positions)] = v
        return flat


def quantize(weight: Tensor, bits: int, name: str) -> tuple[Tensor, Tensor]:
    """Per-row symmetric quantization: returns ``(q, scales)``, int8 of the weight's shape and float32 ``[rows]``."""
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"`bits={bits}` needs finite weights, but {name!r} has NaN or inf. Save it with `bits=None`.")
    if weight.numel() == 0:
        return torch.zeros(weight.shape, dtype=torch.int8), torch.zeros(weight.shape[0])
    codes, scales = grid_codes(weight, bits)
    nonzero_rows = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)
    if not bool(torch.isfinite(scales).all()) or bool(((scales == 0) & nonzero_rows).any()):
        raise ValueError(f"{name!r} has magnitudes outside float32's range (no float32 scale). Use `bits=None`.")
    return codes.to(torch.int8), scales


def weight_values(weight: Tensor, bits: int | None, name: str) -> WeightValues:
    """Reduce a weight to its values (itself, or per-row integer codes with ``bits``); ``name`` is for errors."""
    flat = weight.detach().cpu().contiguous().reshape(-1)
    scales = None
    if bits is None:
        values = flat  # NaN is stored; -0.0 is a zero (loads as +0.0 unless `dense` wins)
    else:
        q, scales = quantize(weight.detach().cpu().contiguous(), bits, name)
        values = q.reshape(-1)
    keep = values.ne(0)
    dropped = 0 if bits is None else int((flat.ne(0) & ~keep).sum())
    positions = torch.nonzero(keep).reshape(-1).numpy()
    return WeightValues(values, bits, keep, positions, values[torch.from_numpy(positions)], scales, dropped)
