"""A compressed single-file format for collapsed (plain, sparse) models, in a safetensors container.

Layout (``format = "lightning-dwf-compressed"``, ``format_version = "1"``): one safetensors file whose string
metadata holds ``format``, ``format_version``, ``bits``, ``tool_version``, a JSON ``manifest`` (one entry per
``state_dict()`` tensor: original name, dtype, shape, encoding and its streams) and ``sha256``, the checksum of
the metadata and every stored byte. Each original tensor ``name`` is stored as one or more safetensors tensors
``name:<stream>``:

* ``raw``: everything that is not a floating-point tensor with >= 2 dims (biases, norm parameters, buffers such as
  ``num_batches_tracked``) is stored as-is, losslessly, in ``name:raw``.
* weights (floating point, >= 2 dims) get the cheapest of these encodings, chosen per tensor by the actual byte
  cost of every candidate:

  - ``dense``: ``values`` holds every element (no pattern; best at low sparsity);
  - ``mask``: ``mask`` is a 1-bit-per-element packed mask (little bit order, flattened row-major), ``values`` the
    non-zeros in order;
  - ``rel8`` / ``rel4``: Deep Compression's relative indices: ``index`` holds, per stored entry, the number of zeros
    skipped since the previous entry (uint8, or 4 bits packed two per byte), ``values`` the entries. A gap longer
    than 255 (15) is bridged by filler entries with value zero, exactly as Deep Compression does.

  ``values`` are the original dtype when ``bits is None`` (exact), else symmetric per-output-row integers
  ``q = clamp(round(w / scale_r), ±(2**(bits-1) - 1))`` with ``scale_r = max_j |w_rj| / (2**(bits-1) - 1)``
  stored as float32 in ``scales``; int8 for ``bits=8``, two's-complement nibbles packed two per byte (low nibble
  first) for ``bits=4``.

The cost of every candidate is its streams' size after raw deflate (with or without a byte shuffle of multi-byte
values, whichever is smaller, or no coding when that is smallest); lzma is then also tried on the winner's streams
(it is ~15x slower and gains a few % more). The codec is recorded per stream; a coded stream is stored as uint8.
Each stream is entropy-coded only where that makes it smaller (the measured gain is in the docs, "Ship it").

Zeros: the pattern is ``w != 0`` (NaN is stored, ``-0.0`` counts as a zero and loads as ``+0.0`` unless ``dense``
wins), so ``bits=None`` round trips every value exactly (``torch.equal``) in its dtype.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf._validation import check_bits
from lightning_dwf.core.functional import SUPPORTED_BITS, grid_codes  # noqa: F401  (SUPPORTED_BITS: re-exported)

FORMAT = "lightning-dwf-compressed"
FORMAT_VERSION = "1"

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]
_REL_MAX_GAP = {"rel8": 255, "rel4": 15}


@dataclass(frozen=True)
class TensorSize:
    """Storage of one ``state_dict()`` tensor in a compressed file.

    Attributes:
        name: ``state_dict()`` key. shape: its shape. dtype: its dtype name (e.g. ``"float32"``).
        numel: number of elements. nonzero: elements ``!= 0`` in the saved tensor.
        quantized_to_zero: non-zeros whose quantized value rounded to 0 and that load as exact zeros (0 when lossless).
        encoding: ``"raw"`` (stored as-is) or the weight encoding ``"dense"``, ``"mask"``, ``"rel8"``, ``"rel4"``.
        codecs: ``"stream=codec"`` per stored stream (``none``, ``deflate``, ``lzma``, ``shuffle+…``).
        stored_bytes: payload bytes of its streams in the file (the safetensors header not included).
        dense_bytes: dense size in bytes, float32 for floating-point tensors, its own dtype otherwise.
        csr_bytes: CSR float32 size in bytes for a weight (``nnz·4`` values + ``nnz·4`` int32 column indices +
            ``(shape[0] + 1)·4`` int32 row pointers); ``dense_bytes`` for any other tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    numel: int
    nonzero: int
    quantized_to_zero: int
    encoding: str
    codecs: str
    stored_bytes: int
    dense_bytes: int
    csr_bytes: int


@dataclass(frozen=True)
class CompressionReport:
    """Sizes of a file written by :func:`save_compressed`.

    Attributes:
        path: the file. bits: ``None`` (lossless), 8 or 4.
        tensors: one row per ``state_dict()`` tensor, in ``state_dict()`` order.
        file_bytes: the file's size on disk (``os.path.getsize``), header included.
        dense_bytes: the whole state dict dense (floating point as float32, other dtypes as themselves), in bytes.
        csr_bytes: the same with every weight in CSR float32 (see :class:`TensorSize`), in bytes.
    """

    path: str
    bits: int | None
    tensors: tuple[TensorSize, ...]
    file_bytes: int
    dense_bytes: int
    csr_bytes: int

    @property
    def ratio(self) -> float:
        """``dense_bytes / file_bytes``: how many times smaller than the dense float32 state dict."""
        return self.dense_bytes / self.file_bytes

    @property
    def csr_ratio(self) -> float:
        """``csr_bytes / file_bytes``: how many times smaller than CSR float32 weights."""
        return self.csr_bytes / self.file_bytes

    @property
    def header_bytes(self) -> int:
        """Bytes of the file that are not tensor payload (safetensors header with the metadata)."""
        return self.file_bytes - sum(t.stored_bytes for t in self.tensors)

    def table(self, title: str | None = None) -> rich.table.Table:  # noqa: F821
        """A ``rich`` table with one row per tensor and a total row."""
        from rich.table import Table

        bits = "lossless" if self.bits is None else f"{self.bits}-bit"
        table = Table(title=title or f"Compressed model file ({bits})")
        left = ("tensor", "shape", "encoding", "codecs")
        for col in (*left[:2], "non-zeros", *left[2:], "stored B", "dense B", "CSR B", "dense/stored"):
            table.add_column(col, justify="left" if col in left else "right")
        for t in self.tensors:
            ratio = f"{t.dense_bytes / t.stored_bytes:.1f}" if t.stored_bytes else "inf"
            table.add_row(
                t.name, "×".join(map(str, t.shape)), f"{t.nonzero:,}", t.encoding, t.codecs,
                f"{t.stored_bytes:,}", f"{t.dense_bytes:,}", f"{t.csr_bytes:,}", ratio,
            )
        table.add_row("header", "", "", "", "", f"{self.header_bytes:,}", "", "", "", end_section=True)
        table.add_row(
            "file", "", f"{sum(t.nonzero for t in self.tensors):,}", "", "", f"{self.file_bytes:,}",
            f"{self.dense_bytes:,}", f"{self.csr_bytes:,}", f"{self.ratio:.1f}",
        )
        return table


# ----------------------------------------------------------------------------------------------- streams and codecs


def _as_bytes(t: Tensor) -> bytes:
    """The raw little-endian bytes of a CPU tensor (any dtype, any number of dims)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _from_bytes(data: bytes, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_as_bytes` for a 1-D tensor; raises ValueError if the length does not fit ``dtype``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) % itemsize:
        raise ValueError(f"a stream of {len(data)} bytes is not a whole number of {dtype} elements")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype) if data else torch.empty(0, dtype=dtype)


def _shuffle(data: bytes, itemsize: int) -> bytes:
    """Byte-plane shuffle: all first bytes of the elements, then all second bytes… (helps entropy coders on floats)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T.tobytes()


def _unshuffle(data: bytes, itemsize: int) -> bytes:
    return np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1).T.tobytes()


def _deflate(data: bytes) -> bytes:
    # raw deflate (no header: the file has its own checksum); level 9 is ~20x slower on mostly-zero data
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


_COMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "deflate": _deflate,
    "lzma": lambda data: lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
}
_DECOMPRESS: dict[str, Callable[[bytes], bytes]] = {
    "deflate": lambda data: zlib.decompress(data, -15),
    "lzma": lambda data: lzma.decompress(data, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS),
}


@dataclass(frozen=True)
class _Stream:
    """One stored stream: ``data`` is what goes into the file (the tensor itself when ``codec == "none"``)."""

    data: Tensor
    codec: str
    numel: int  # elements of the decoded stream

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


def _code_stream(t: Tensor, lzma_too: bool = False) -> _Stream:
    """The smallest of ``t`` as-is and ``t`` deflated (with and without byte shuffle).

    With ``lzma_too`` lzma is also tried, on the input (shuffled or not) that deflated best and only if deflate
    paid at all: lzma is ~15x slower than deflate and on these streams gains at most ~10 % over it.
    """
    t = t.detach().cpu().contiguous().reshape(-1)
    best = _Stream(t, "none", t.numel())
    if t.numel() == 0:
        return best
    raw = _as_bytes(t)
    inputs = {"": raw}
    if t.element_size() > 1:
        inputs["shuffle+"] = _shuffle(raw, t.element_size())
    best_input = None
    for prefix, data in inputs.items():
        coded = _deflate(data)
        if len(coded) < best.nbytes:
            best = _Stream(torch.frombuffer(bytearray(coded), dtype=torch.uint8), prefix + "deflate", t.numel())
            best_input = prefix
    if lzma_too and best_input is not None:
        coded = _COMPRESS["lzma"](inputs[best_input])
        if len(coded) < best.nbytes:
            best = _Stream(torch.frombuffer(bytearray(coded), dtype=torch.uint8), best_input + "lzma", t.numel())
    return best


def _decode_stream(stored: Tensor, codec: str, numel: int, dtype: torch.dtype) -> Tensor:
    """Inverse of :func:`_code_stream`; raises ValueError on any inconsistency."""
    if codec == "none":
        if stored.dtype != dtype or stored.numel() != numel:
            raise ValueError(f"expected {numel} {dtype} elements, found {stored.numel()} {stored.dtype}")
        return stored.reshape(-1)
    shuffled, _, name = codec.rpartition("+")
    if name not in _DECOMPRESS or shuffled not in ("", "shuffle") or stored.dtype != torch.uint8:
        raise ValueError(f"unknown codec {codec!r} or stored dtype {stored.dtype}")
    data = _DECOMPRESS[name](_as_bytes(stored))
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(data) != numel * itemsize:
        raise ValueError(f"decompressed {len(data)} bytes, expected {numel} × {itemsize}")
    if shuffled:
        data = _unshuffle(data, itemsize)
    return _from_bytes(data, dtype)


# -------------------------------------------------------------------------------------------- patterns and values


def _pack_nibbles(q: Tensor) -> Tensor:
    """Integers in [-8, 7] → uint8, two's-complement nibbles, element 2i in the low nibble of byte i."""
    n = q.numel()
    u = (q.reshape(-1).to(torch.int16) & 0xF).to(torch.uint8)
    if n % 2:
        u = torch.cat([u, u.new_zeros(1)])
    return u[0::2] | (u[1::2] << 4)


def _unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} nibbles")
    u = torch.stack([packed & 0xF, packed >> 4], dim=1).reshape(-1)[:n].to(torch.int8)
    return torch.where(u > 7, u - 16, u)


def _relative_index(positions: np.ndarray, max_gap: int) -> tuple[np.ndarray, np.ndarray]:
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


def _quantize(weight: Tensor, bits: int, name: str) -> tuple[Tensor, Tensor]:
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


def _candidates(
    weight: Tensor, bits: int | None, name: str
) -> tuple[dict[str, dict[str, Tensor]], dict[str, int], int]:
    """Every encoding of a weight, uncoded: ``({encoding: {stream: tensor}}, {encoding: entries}, quantized_to_zero)``.

    ``entries`` is the number of stored values (all elements for ``dense``; non-zeros plus fillers for ``rel*``).
    """
    w = weight.detach().cpu().contiguous()
    flat = w.reshape(-1)
    extra: dict[str, Tensor] = {}
    if bits is None:
        values, keep = flat, flat.ne(0)  # NaN is stored; -0.0 is a zero (loads as +0.0 unless `dense` wins)
        dropped = 0
        pack: Callable[[Tensor], Tensor] = lambda v: v  # noqa: E731
    else:
        q, scales = _quantize(w, bits, name)
        values = q.reshape(-1)
        keep = values.ne(0)
        dropped = int((flat.ne(0) & ~keep).sum())
        extra["scales"] = scales
        pack = _pack_nibbles if bits == 4 else (lambda v: v)
    positions = torch.nonzero(keep).reshape(-1).numpy()
    candidates: dict[str, dict[str, Tensor]] = {"dense": {"values": pack(values), **extra}}
    entries = {"dense": values.numel(), "mask": positions.size}
    kept = values[torch.from_numpy(positions)]
    mask = np.packbits(keep.numpy(), bitorder="little")
    candidates["mask"] = {"mask": torch.from_numpy(mask), "values": pack(kept), **extra}
    for enc, max_gap in _REL_MAX_GAP.items():
        gaps, real = _relative_index(positions, max_gap)
        stored = values.new_zeros(gaps.size)
        stored[torch.from_numpy(real)] = kept
        index = torch.from_numpy(gaps.astype(np.uint8))
        candidates[enc] = {"index": index if enc == "rel8" else _pack_nibbles(index), "values": pack(stored), **extra}
        entries[enc] = gaps.size
    return candidates, entries, dropped


def _encode_weight(weight: Tensor, bits: int | None, name: str) -> tuple[str, dict[str, _Stream], int, int]:
    """The cheapest encoding of a weight: ``(encoding, streams, entries, quantized_to_zero)``.

    Every candidate's streams are costed with deflate (fast); lzma is then tried on the winner's streams only.
    """
    candidates, entries, dropped = _candidates(weight, bits, name)
    coded = {enc: {k: _code_stream(t) for k, t in streams.items()} for enc, streams in candidates.items()}
    cost = {enc: sum(s.nbytes for s in streams.values()) for enc, streams in coded.items()}
    enc = min(cost, key=lambda e: (cost[e], list(cost).index(e)))  # ties: the first (simplest) encoding
    coded[enc] = {k: _code_stream(t, lzma_too=True) for k, t in candidates[enc].items()}  # lzma only on the winner
    return enc, coded[enc], entries[enc], dropped


def _decode_weight(entry: Mapping[str, Any], streams: Mapping[str, Tensor], bits: int | None) -> Tensor:
    """Inverse of :func:`_encode_weight`; raises ValueError on any inconsistency."""
    dtype, shape, enc = _dtype(entry["dtype"]), tuple(entry["shape"]), entry["encoding"]
    numel = int(np.prod(shape, dtype=np.int64))
    info = entry["streams"]

    def stream(key: str, sdtype: torch.dtype) -> Tensor:
        codec, n = info[key]
        return _decode_stream(streams[key], codec, int(n), sdtype)

    def values(n: int) -> Tensor:
        if bits is None:
            v = stream("values", dtype)
        elif bits == 8:
            v = stream("values", torch.int8)
        else:
            v = _unpack_nibbles(stream("values", torch.uint8), n)
        if v.numel() != n:
            raise ValueError(f"{v.numel()} values for {n} entries")
        return v

    if enc == "dense":
        flat = values(numel)
    else:
        if enc == "mask":
            mask = stream("mask", torch.uint8).numpy()
            if mask.size != (numel + 7) // 8:
                raise ValueError(f"a mask of {mask.size} bytes for {numel} elements")
            positions = np.flatnonzero(np.unpackbits(mask, count=numel, bitorder="little"))
        elif enc in _REL_MAX_GAP:
            index = stream("index", torch.uint8)
            gaps = index if enc == "rel8" else _unpack_nibbles(index, int(entry["entries"])) & 0xF
            positions = np.cumsum(gaps.numpy().astype(np.int64) + 1) - 1
            if positions.size and positions[-1] >= numel:
                raise ValueError(f"relative indices run past the tensor's {numel} elements")
        else:
            raise ValueError(f"unknown encoding {enc!r}")
        v = values(positions.size)
        flat = v.new_zeros(numel)
        flat[torch.from_numpy(positions)] = v
    if bits is not None:
        scales = stream("scales", torch.float32)
        if scales.numel() != shape[0]:
            raise ValueError(f"{scales.numel()} scales for {shape[0]} rows")
        compute = torch.promote_types(dtype, torch.float32)
        flat = (flat.reshape(shape[0], -1).to(compute) * scales.to(compute)[:, None]).to(dtype)
    return flat.reshape(shape).clone()


# ------------------------------------------------------------------------------------------------------ public API


def _is_weight(t: Tensor) -> bool:
    """Tensors that get sparse/quantized encoding: floating point with >= 2 dims (Linear/Conv weights)."""
    return t.is_floating_point() and t.dim() >= 2


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tool_version() -> str:
    try:
        import lightning_dwf  # lazy: lightning_dwf may import this module

        return str(getattr(lightning_dwf, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "unknown"


def _checksum(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the metadata (without ``sha256``) and every stored tensor's key, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, _dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(_as_bytes(t))
    return h.hexdigest()


def _check_plain(module: nn.Module, what: str) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}.")
    names = [name or "<root>" for name, m in module.named_modules() if parametrize.is_parametrized(m)]
    if names:
        raise ValueError(
            f"`module` is still factorized (parametrized: {', '.join(names[:3])}{'…' if len(names) > 3 else ''}); "
            f"{what} works on plain weights. Call `lightning_dwf.collapse_(module)` first (a QSD-decomposed module: "
            "`lightning_dwf.decompose.decompose.save_decomposed` or `collapse_decomposed_`)."
        )


def save_compressed(module: nn.Module, path: str | os.PathLike[str], *, bits: int | None = None) -> CompressionReport:
    """Write the whole ``state_dict()`` of a plain (collapsed) module to one compressed safetensors file.

    Floating-point tensors with >= 2 dims (Linear/Conv weights) are stored sparse: per tensor the cheapest of
    dense, a 1-bit mask and Deep Compression relative indices (8- or 4-bit gaps with zero fillers), by the actual
    byte cost, each stream entropy-coded when that pays (see the module docstring for the layout). Every other
    entry (biases, norm parameters, buffers) is stored as-is. ``bits=None`` is exact (every value, in its dtype;
    ``-0.0`` may load as ``+0.0``). ``bits=8`` / ``bits=4`` quantize each weight per output row (dim 0), symmetric
    and uniform: ``scale_r = max|w_r| / (2**(bits-1) - 1)`` (float32), ``|w' - w| <= scale_r / 2`` up to the
    rounding of the weight's dtype; a zero stays an exact zero, and a non-zero with ``|w| < scale_r / 2`` quantizes
    to 0 and loads as an exact zero (counted in :attr:`TensorSize.quantized_to_zero`). The file is written to
    ``path + ".tmp"`` and then renamed, so an interrupted save leaves no half-written ``path``.

    Args:
        module: a plain model (not factorized); only its ``state_dict()`` is saved.
        path: the file to write (conventionally ``*.safetensors``); overwritten if it exists.
        bits: ``None`` (lossless), 8 or 4 (bits per quantized weight value).

    Returns:
        The sizes, measured on the written file.

    Raises:
        ValueError: ``bits`` is not None, 8 or 4; ``module`` is still factorized; a weight is not finite with ``bits``.
    """
    bits = check_bits(bits, "bits")
    _check_plain(module, "save_compressed")
    return save_state(module.state_dict(), path, bits=bits)


def save_state(
    state: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    bits: int | None = None,
    metadata: Mapping[str, str] | None = None,
) -> CompressionReport:
    """Write a mapping of named tensors to one compressed file, exactly as :func:`save_compressed` writes a module's.

    The building block of :func:`save_compressed` (which passes ``module.state_dict()``) for callers that store
    tensors a module does not hold as such (e.g. :func:`~lightning_dwf.save_decomposed`). Read the file
    back with :func:`load_state` (or :func:`load_compressed` when the names match a module's ``state_dict()``).

    Args:
        state: name → tensor, saved in this order.
        path: the file to write; overwritten if it exists.
        bits: ``None`` (lossless), 8 or 4, applied to every floating-point tensor with >= 2 dims.
        metadata: extra string metadata stored in the header (covered by the checksum); must not reuse the format's
            own keys (``format``, ``format_version``, ``bits``, ``tool_version``, ``manifest``, ``sha256``).

    Returns:
        The sizes, measured on the written file.

    Raises:
        ValueError: bad ``bits``, a non-tensor value, a reserved metadata key, or a weight that is not finite with
            ``bits``.
    """
    bits = check_bits(bits, "bits")
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors: dict[str, Tensor] = {}
    manifest: list[dict[str, Any]] = []
    rows: list[TensorSize] = []
    with torch.no_grad():
        for name, value in state.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor: cannot save.")
            t = value.detach().cpu()
            entry: dict[str, Any] = {"name": name, "dtype": _dtype_name(t.dtype), "shape": list(t.shape)}
            numel, dropped = t.numel(), 0
            nonzero = int(t.count_nonzero()) if t.dtype != torch.bool else int(t.sum())
            if _is_weight(t):
                enc, streams, entries, dropped = _encode_weight(t, bits, name)
                entry["entries"] = entries
                entry["streams"] = {k: [s.codec, s.numel] for k, s in streams.items()}
            else:
                enc, streams = "raw", {"raw": _Stream(t.contiguous(), "none", numel)}
            entry["encoding"] = enc
            manifest.append(entry)
            for key, s in streams.items():
                tensors[f"{name}:{key}"] = s.data
            dense = numel * (4 if t.is_floating_point() else t.element_size())
            csr = nonzero * 8 + (t.shape[0] + 1) * 4 if _is_weight(t) else dense
            rows.append(TensorSize(
                name, tuple(t.shape), _dtype_name(t.dtype), numel, nonzero, dropped, enc,
                ",".join(f"{k}={s.codec}" for k, s in streams.items()), sum(s.nbytes for s in streams.values()),
                dense, csr,
            ))
    reserved = {"format", "format_version", "bits", "tool_version", "manifest", "sha256"}
    clash = sorted(reserved & set(metadata or {}))
    if clash:
        raise ValueError(f"`metadata` must not set the format's own keys {clash}.")
    header = {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": "none" if bits is None else str(bits),
        "tool_version": _tool_version(),
        "manifest": json.dumps(manifest, separators=(",", ":")),
    }
    header["sha256"] = _checksum(header, tensors)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return CompressionReport(
        path, bits, tuple(rows), os.path.getsize(path), sum(r.dense_bytes for r in rows), sum(r.csr_bytes for r in rows)
    )


def _read(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and stored tensors of a safetensors file, every failure as ValueError naming ``path``."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as exc:  # safetensors raises SafetensorError and others (e.g. on a truncated header)
        raise ValueError(
            f"{path!r} is not a readable safetensors file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    return metadata, tensors


def _open(path: str) -> tuple[dict[str, str], int | None, dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Read and check a file (format, version, checksum, header): ``(metadata, bits, manifest by name, tensors)``."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No compressed model file at {path!r}.")
    metadata, tensors = _read(path)
    fmt, version = metadata.get("format"), metadata.get("format_version")
    if fmt != FORMAT:
        raise ValueError(f"{path!r} is not a {FORMAT} file (metadata `format` is {fmt!r}); read it with safetensors.")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {version!r}, but this lightning-dwf reads version {FORMAT_VERSION!r} "
            f"(file written by lightning-dwf {metadata.get('tool_version', 'unknown')}). Load it with that version."
        )
    if metadata.get("sha256") != _checksum(metadata, tensors):
        raise ValueError(f"{path!r} fails its sha256 checksum: the file is corrupt (changed after it was written).")
    try:
        bits = None if metadata["bits"] == "none" else int(metadata["bits"])
        manifest = json.loads(metadata["manifest"])
        entries = {e["name"]: e for e in manifest}
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path!r} has a malformed header ({type(exc).__name__}: {exc}).") from exc
    return metadata, bits, entries, tensors


def _decode_all(
    path: str, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor], bits: int | None
) -> dict[str, Tensor]:
    """Every tensor of an opened file, decoded, in the file's order."""
    decoded: dict[str, Tensor] = {}
    for name, entry in entries.items():
        try:
            if entry["encoding"] == "raw":
                raw = tensors[f"{name}:raw"]
                if raw.dtype != _dtype(entry["dtype"]) or tuple(raw.shape) != tuple(entry["shape"]):
                    raise ValueError(f"stored as {raw.dtype} {tuple(raw.shape)}")
                decoded[name] = raw
            else:
                decoded[name] = _decode_weight(entry, {k: tensors[f"{name}:{k}"] for k in entry["streams"]}, bits)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, zlib.error, lzma.LZMAError) as exc:
            raise ValueError(f"{path!r} is corrupt: cannot decode {name!r} ({type(exc).__name__}: {exc}).") from exc
    return decoded


def load_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a file written by :func:`save_state` or :func:`save_compressed`, decoded, and its metadata.

    Args:
        path: the file.

    Returns:
        ``(tensors, metadata)``: name → decoded tensor in the file's order, and the header's string metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable safetensors file, not this format, another format version, fails its
            checksum or cannot be decoded.
    """
    path = os.fspath(path)
    metadata, bits, entries, tensors = _open(path)
    return _decode_all(path, entries, tensors, bits), metadata


def load_compressed(path: str | os.PathLike[str], module: nn.Module) -> nn.Module:
    """Fill a plain module of the same architecture, in place, from a file written by :func:`save_compressed`.

    The file is read, checked (format, version, sha256 checksum), matched against ``module.state_dict()`` and
    completely decoded before the module is touched; only then ``module.load_state_dict(decoded, strict=True)``
    runs, so on any error the module is unchanged.

    Args:
        path: a file written by :func:`save_compressed`.
        module: a plain (not factorized) module with the same ``state_dict()`` names, shapes and dtypes.

    Returns:
        ``module``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a readable safetensors file, not this format, another format version, fails its
            checksum (truncated or corrupt) or does not match ``module``; the message names the first mismatch
            (walking ``module.state_dict()`` in order, then the file's extra names).
    """
    _check_plain(module, "load_compressed")
    path = os.fspath(path)
    _, bits, entries, tensors = _open(path)

    state = module.state_dict()
    for name, value in state.items():
        problem, shape = None, tuple(value.shape)
        if name not in entries:
            problem = f"the file has no {name!r}"
        elif tuple(entries[name]["shape"]) != shape:
            problem = f"{name!r} has shape {tuple(entries[name]['shape'])} in the file, {shape} in the module"
        elif entries[name]["dtype"] != _dtype_name(value.dtype):
            problem = f"{name!r} is {entries[name]['dtype']} in the file, {_dtype_name(value.dtype)} in the module"
        if problem:
            raise ValueError(f"{path!r} does not match the module: {problem}. Module unchanged.")
    for name in entries:
        if name not in state:
            raise ValueError(f"{path!r} does not match the module: the module has no {name!r}. Module unchanged.")

    decoded = _decode_all(path, entries, tensors, bits)
    module.load_state_dict(decoded, strict=True)
    return module
