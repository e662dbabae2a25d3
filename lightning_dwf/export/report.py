"""What :func:`~lightning_dwf.save_compressed` wrote: the bytes of every tensor and of the file, against dense and CSR.

The sizes are measured on the written file, so they are what a user ships, not an estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import rich.table


@dataclass(frozen=True)
class TensorSize:
    """Storage of one ``state_dict()`` tensor in a compressed file.

    Attributes:
        name: ``state_dict()`` key. shape: its shape. dtype: its dtype name (e.g. ``"float32"``).
        numel: number of elements. nonzero: elements ``!= 0`` in the saved tensor.
        quantized_to_zero: non-zeros whose quantized value rounded to 0 and that load as exact zeros (0 when lossless).
        encoding: ``"raw"`` (stored as-is) or the name of the weight's encoding (built in: ``"dense"``, ``"mask"``,
            ``"rel8"``, ``"rel4"``).
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
    """Sizes of a file written by :func:`~lightning_dwf.save_compressed`.

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

    def table(self, title: str | None = None) -> rich.table.Table:
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
