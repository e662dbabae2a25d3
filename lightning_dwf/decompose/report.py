"""What the decomposition reports: per layer and in total (:func:`~lightning_dwf.decompose.decompose_`), and the
sizes of a written file (:func:`~lightning_dwf.decompose.save_decomposed`). Frozen records those functions fill."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightning_dwf.export import CompressionReport

if TYPE_CHECKING:
    from rich.table import Table

__all__ = ["DecomposedFileReport", "DecompositionReport", "LayerDecomposition"]


@dataclass(frozen=True)
class LayerDecomposition:
    """One decomposed weight.

    Attributes:
        name: qualified tensor name. shape: the weight's shape. matrix: ``(rows, cols)`` it was decomposed as.
        rank: r. bits: the factors' grid (``None``: float).
        nonzero_u / nonzero_v: non-zeros of the effective factors; numel_u / numel_v: their sizes.
        svd_error: relative Frobenius error of the unconstrained truncated SVD at rank r.
        init_error: of the projected (sparsified, quantized) SVD: the naive baseline at the same budget.
        error: ``||W − UV||_F / ||W||_F`` after PGD, before any fine-tuning.
        stored_bytes: payload bytes of ``U`` and ``V`` in a :func:`save_decomposed` file at ``bits`` (entropy coded,
            header excluded). dense_bytes: the weight as dense float32 (``numel · 4``).
        weight_sq_norm: ``||W||_F²`` (to aggregate errors).
    """

    name: str
    shape: tuple[int, ...]
    matrix: tuple[int, int]
    rank: int
    bits: int | None
    nonzero_u: int
    nonzero_v: int
    numel_u: int
    numel_v: int
    svd_error: float
    init_error: float
    error: float
    stored_bytes: int
    dense_bytes: int
    weight_sq_norm: float


@dataclass(frozen=True)
class DecompositionReport:
    """What :func:`decompose_` did.

    Attributes:
        layers: one row per decomposed weight. skipped: ``(name, reason)`` for selected weights left dense.
    """

    layers: tuple[LayerDecomposition, ...]
    skipped: tuple[tuple[str, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        """Qualified names of the decomposed weights, in module order."""
        return tuple(layer.name for layer in self.layers)

    @property
    def nonzeros(self) -> int:
        """Non-zeros of all factors."""
        return sum(layer.nonzero_u + layer.nonzero_v for layer in self.layers)

    @property
    def stored_bytes(self) -> int:
        """Payload bytes of all factors (see :attr:`LayerDecomposition.stored_bytes`)."""
        return sum(layer.stored_bytes for layer in self.layers)

    @property
    def dense_bytes(self) -> int:
        """The decomposed weights as dense float32, in bytes."""
        return sum(layer.dense_bytes for layer in self.layers)

    @property
    def error(self) -> float:
        """Relative error of all decomposed weights together: ``sqrt(Σ err²·||W||²) / sqrt(Σ ||W||²)``."""
        total = sum(layer.weight_sq_norm for layer in self.layers)
        if total == 0:
            return 0.0
        return math.sqrt(sum(layer.error**2 * layer.weight_sq_norm for layer in self.layers) / total)

    def table(self, title: str = "Quantized sparse weight decomposition") -> Table:
        """A ``rich`` table with one row per layer and a total row."""
        from rich.table import Table

        table = Table(title=title)
        for col in ("layer", "shape", "rank", "bits", "nnz U", "nnz V", "SVD err", "init err", "err", "stored B",
                    "dense B"):
            table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for t in self.layers:
            table.add_row(t.name, "×".join(map(str, t.shape)), str(t.rank), str(t.bits), f"{t.nonzero_u:,}",
                          f"{t.nonzero_v:,}", f"{t.svd_error:.4f}", f"{t.init_error:.4f}", f"{t.error:.4f}",
                          f"{t.stored_bytes:,}", f"{t.dense_bytes:,}")
        table.add_row("total", "", "", "", "", f"{self.nonzeros:,}", "", "", f"{self.error:.4f}",
                      f"{self.stored_bytes:,}", f"{self.dense_bytes:,}")
        return table


@dataclass(frozen=True)
class DecomposedFileReport:
    """Sizes of a file written by :func:`save_decomposed`.

    Attributes:
        compressed: the per-stored-tensor report of the container (factors appear as ``<name>.qsd_u`` / ``.qsd_v``;
            its ``dense_bytes`` is that of the stored tensors, not of the model).
        layers: names of the decomposed tensors.
        dense_bytes: the plain model's ``state_dict()`` dense (floating point as float32, decomposed weights at
            their full shape), in bytes: the baseline of :attr:`ratio`.
    """

    compressed: CompressionReport
    layers: tuple[str, ...]
    dense_bytes: int

    @property
    def path(self) -> str:
        """The written file."""
        return self.compressed.path

    @property
    def bits(self) -> int | None:
        """The file's quantization (one for every weight in it; ``None``: float values)."""
        return self.compressed.bits

    @property
    def file_bytes(self) -> int:
        """The file's size on disk (``os.path.getsize``), header included."""
        return self.compressed.file_bytes

    @property
    def ratio(self) -> float:
        """``dense_bytes / file_bytes``: how many times smaller than the dense float32 model."""
        return self.dense_bytes / self.file_bytes
