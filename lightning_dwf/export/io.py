"""Saving and loading compressed files: a module's ``state_dict()`` or any named tensors, checked before use.

Saving encodes every weight (floating point, >= 2 dims) with :func:`~lightning_dwf.export.encode_weight` and
stores every other tensor as-is; loading reads and checks the whole file, decodes it, and only then touches the
module, so a wrong file raises :class:`~lightning_dwf.errors.DWFFileError` and changes nothing.
"""

from __future__ import annotations

import lzma
import os
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf._validation import check_bits
from lightning_dwf.errors import DWFFileError
from lightning_dwf.export.codecs import Stream
from lightning_dwf.export.encodings import decode_weight, encode_weight
from lightning_dwf.export.format import checksum, dtype_from_name, dtype_name, header, open_file
from lightning_dwf.export.report import CompressionReport, TensorSize


def _is_weight(t: Tensor) -> bool:
    """Tensors that get sparse/quantized encoding: floating point with >= 2 dims (Linear/Conv weights)."""
    return t.is_floating_point() and t.dim() >= 2


def _check_plain(module: nn.Module, what: str) -> None:
    """Refuse anything but a plain module: a factorized one must be collapsed first (its state holds factors)."""
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
    byte cost, each stream entropy-coded when that pays (see :mod:`lightning_dwf.export`). Every other
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
            entry: dict[str, Any] = {"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            numel, dropped = t.numel(), 0
            nonzero = int(t.count_nonzero()) if t.dtype != torch.bool else int(t.sum())
            if _is_weight(t):
                enc, streams, entries, dropped = encode_weight(t, bits, name)
                entry["entries"] = entries
                entry["streams"] = {k: [s.codec, s.numel] for k, s in streams.items()}
            else:
                enc, streams = "raw", {"raw": Stream(t.contiguous(), "none", numel)}
            entry["encoding"] = enc
            manifest.append(entry)
            for key, s in streams.items():
                tensors[f"{name}:{key}"] = s.data
            dense = numel * (4 if t.is_floating_point() else t.element_size())
            csr = nonzero * 8 + (t.shape[0] + 1) * 4 if _is_weight(t) else dense
            rows.append(TensorSize(
                name, tuple(t.shape), dtype_name(t.dtype), numel, nonzero, dropped, enc,
                ",".join(f"{k}={s.codec}" for k, s in streams.items()), sum(s.nbytes for s in streams.values()),
                dense, csr,
            ))
    meta = header(bits, manifest, metadata)
    meta["sha256"] = checksum(meta, tensors)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return CompressionReport(
        path, bits, tuple(rows), os.path.getsize(path), sum(r.dense_bytes for r in rows), sum(r.csr_bytes for r in rows)
    )


def _decode_all(
    path: str, entries: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Tensor], bits: int | None
) -> dict[str, Tensor]:
    """Every tensor of an opened file, decoded, in the file's order; any failure is a DWFFileError naming it."""
    decoded: dict[str, Tensor] = {}
    for name, entry in entries.items():
        try:
            if entry["encoding"] == "raw":
                raw = tensors[f"{name}:raw"]
                if raw.dtype != dtype_from_name(entry["dtype"]) or tuple(raw.shape) != tuple(entry["shape"]):
                    raise ValueError(f"stored as {raw.dtype} {tuple(raw.shape)}")
                decoded[name] = raw
            else:
                decoded[name] = decode_weight(entry, {k: tensors[f"{name}:{k}"] for k in entry["streams"]}, bits)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, zlib.error, lzma.LZMAError) as exc:
            raise DWFFileError(f"{path!r} is corrupt: cannot decode {name!r} ({type(exc).__name__}: {exc}).") from exc
    return decoded


def load_state(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Every tensor of a file written by :func:`save_state` or :func:`save_compressed`, decoded, and its metadata.

    Args:
        path: the file.

    Returns:
        ``(tensors, metadata)``: name → decoded tensor in the file's order, and the header's string metadata.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DWFFileError: the file is not a readable safetensors file, not this format, another format version, fails
            its checksum or cannot be decoded (a ValueError, as before).
    """
    path = os.fspath(path)
    metadata, bits, entries, tensors = open_file(path)
    return _decode_all(path, entries, tensors, bits), metadata


def _mismatch(state: Mapping[str, Tensor], entries: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The first difference between a module's ``state_dict()`` and a file's manifest, or None."""
    for name, value in state.items():
        shape = tuple(value.shape)
        if name not in entries:
            return f"the file has no {name!r}"
        if tuple(entries[name]["shape"]) != shape:
            return f"{name!r} has shape {tuple(entries[name]['shape'])} in the file, {shape} in the module"
        if entries[name]["dtype"] != dtype_name(value.dtype):
            return f"{name!r} is {entries[name]['dtype']} in the file, {dtype_name(value.dtype)} in the module"
    extra = [name for name in entries if name not in state]
    return f"the module has no {extra[0]!r}" if extra else None


def load_compressed(module: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Fill a plain module of the same architecture, in place, from a file written by :func:`save_compressed`.

    The file is read, checked (format, version, sha256 checksum), matched against ``module.state_dict()`` and
    completely decoded before the module is touched; only then ``module.load_state_dict(decoded, strict=True)``
    runs, so on any error the module is unchanged. The argument order is that of :func:`save_compressed` (and of
    safetensors' ``load_model(model, filename)``); the old order ``load_compressed(path, module)`` still works for
    one release, with a ``FutureWarning``.

    Args:
        module: a plain (not factorized) module with the same ``state_dict()`` names, shapes and dtypes.
        path: a file written by :func:`save_compressed`.

    Returns:
        ``module``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DWFFileError: the file is not a readable safetensors file, not this format, another format version, fails
            its checksum (truncated or corrupt) or does not match ``module``; the message names the first mismatch
            (walking ``module.state_dict()`` in order, then the file's extra names). A ValueError, as before.
        ValueError: ``module`` is still factorized.
    """
    if isinstance(module, (str, os.PathLike)) and isinstance(path, nn.Module):
        warnings.warn(
            "load_compressed(path, module) is deprecated and stops working in the next release: call "
            "load_compressed(module, path), the order of save_compressed(module, path).",
            FutureWarning,
            stacklevel=2,
        )
        module, path = path, module
    _check_plain(module, "load_compressed")
    path = os.fspath(path)
    _, bits, entries, tensors = open_file(path)
    state = module.state_dict()
    problem = _mismatch(state, entries)
    if problem:
        raise DWFFileError(f"{path!r} does not match the module: {problem}. Module unchanged.")
    decoded = _decode_all(path, entries, tensors, bits)
    module.load_state_dict(decoded, strict=True)
    return module
