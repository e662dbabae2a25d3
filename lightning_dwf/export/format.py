"""The file format: its name and version, the header's keys, dtype names, the checksum, and opening a file.

A file is one safetensors file whose string metadata holds :data:`FORMAT`, :data:`FORMAT_VERSION`, ``bits``,
``tool_version``, a JSON ``manifest`` (one entry per saved tensor) and ``sha256``, the checksum of the metadata and of
every stored byte. :func:`open_file` refuses anything else with :class:`~lightning_dwf.errors.DWFFileError`, so a
file of another format, another version, or damaged after it was written is an error, never wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_dwf.errors import DWFFileError
from lightning_dwf.export.codecs import as_bytes

FORMAT = "lightning-dwf-compressed"
FORMAT_VERSION = "1"

#: The header keys the format owns (in the order they are written); extra metadata must not reuse them.
RESERVED_KEYS = ("format", "format_version", "bits", "tool_version", "manifest", "sha256")


def dtype_name(dtype: torch.dtype) -> str:
    """The name a file records for ``dtype`` (``torch.float32`` → ``"float32"``)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises ValueError for a name that is not a torch dtype."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def bits_name(bits: int | None) -> str:
    """The header's ``bits`` value: ``"none"`` (lossless), ``"8"`` or ``"4"``."""
    return "none" if bits is None else str(bits)


def tool_version() -> str:
    """The installed lightning-dwf version, recorded in every file so a reader of another version can say which."""
    try:
        import lightning_dwf  # lazy: lightning_dwf imports this package

        return str(getattr(lightning_dwf, "__version__", "unknown"))
    except ImportError:  # pragma: no cover
        return "unknown"


def checksum(metadata: Mapping[str, str], tensors: Mapping[str, Tensor]) -> str:
    """sha256 over the metadata (without ``sha256``) and every stored tensor's key, dtype, shape and bytes."""
    h = hashlib.sha256(json.dumps({k: v for k, v in metadata.items() if k != "sha256"}, sort_keys=True).encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(json.dumps([key, dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(as_bytes(t))
    return h.hexdigest()


def header(bits: int | None, manifest: list[dict[str, Any]], metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The string metadata of a file, without ``sha256``: the caller's ``metadata`` first, then the format's keys.

    Raises:
        ValueError: ``metadata`` sets one of :data:`RESERVED_KEYS`.
    """
    clash = sorted(set(RESERVED_KEYS) & set(metadata or {}))
    if clash:
        raise ValueError(f"`metadata` must not set the format's own keys {clash}.")
    return {
        **{str(k): str(v) for k, v in (metadata or {}).items()},
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bits": bits_name(bits),
        "tool_version": tool_version(),
        "manifest": json.dumps(manifest, separators=(",", ":")),
    }


def read_file(path: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and stored tensors of a safetensors file, every failure as DWFFileError naming ``path``."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
    except Exception as exc:  # safetensors raises SafetensorError and others (e.g. on a truncated header)
        raise DWFFileError(
            f"{path!r} is not a readable safetensors file (truncated or corrupt?): {type(exc).__name__}: {exc}"
        ) from exc
    return metadata, tensors


def open_file(path: str) -> tuple[dict[str, str], int | None, dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Read and check a file (format, version, checksum, header): ``(metadata, bits, manifest by name, tensors)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DWFFileError: not a readable safetensors file, not this format, another version, a failed checksum or a
            malformed header.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No compressed model file at {path!r}.")
    metadata, tensors = read_file(path)
    fmt, version = metadata.get("format"), metadata.get("format_version")
    if fmt != FORMAT:
        raise DWFFileError(f"{path!r} is not a {FORMAT} file (metadata `format` is {fmt!r}); read it with safetensors.")
    if version != FORMAT_VERSION:
        raise DWFFileError(
            f"{path!r} has format version {version!r}, but this lightning-dwf reads version {FORMAT_VERSION!r} "
            f"(file written by lightning-dwf {metadata.get('tool_version', 'unknown')}). Load it with that version."
        )
    if metadata.get("sha256") != checksum(metadata, tensors):
        raise DWFFileError(f"{path!r} fails its sha256 checksum: the file is corrupt (changed after it was written).")
    try:
        bits = None if metadata["bits"] == "none" else int(metadata["bits"])
        manifest = json.loads(metadata["manifest"])
        entries = {e["name"]: e for e in manifest}
    except (KeyError, TypeError, ValueError) as exc:
        raise DWFFileError(f"{path!r} has a malformed header ({type(exc).__name__}: {exc}).") from exc
    return metadata, bits, entries, tensors
