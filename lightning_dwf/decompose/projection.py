"""The projected-gradient math of the decomposition: sparse (quantized) factors ``U @ V ≈ W`` of one matrix.

Pure tensor functions, no modules: :func:`decompose_matrix` starts from the balanced truncated SVD and alternates
projected gradient steps on ``U`` and ``V`` (see :mod:`lightning_dwf.decompose` for the algorithm and its sources).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_dwf.core.functional import fake_quantize, quantize_to_grid

__all__ = ["MatrixDecomposition", "decompose_matrix"]


def fake_quantize_rows(x: Tensor, bits: int | None) -> Tensor:
    """Straight-through fake quantization on the per-row grid (identity for ``bits=None``)."""
    return x if bits is None else fake_quantize(x, bits)


def _project(x: Tensor, keep: int, bits: int | None) -> Tensor:
    """Keep the ``keep`` largest magnitudes of ``x`` (zero the rest), then round each row to its grid."""
    flat = x.reshape(-1)
    if keep < flat.numel():
        out = torch.zeros_like(flat)
        if keep > 0:
            idx = flat.abs().topk(keep, sorted=False).indices
            out[idx] = flat[idx]
        x = out.reshape(x.shape)
    return x if bits is None else quantize_to_grid(x.detach(), bits)


def _spectral_sq(gram: Tensor) -> float:
    """``||A||₂²`` from the (small, symmetric PSD) Gram matrix ``A Aᵀ`` or ``Aᵀ A``."""
    return float(torch.linalg.eigvalsh(gram.double())[-1].clamp_min(0))


@dataclass(frozen=True)
class MatrixDecomposition:
    """Result of :func:`decompose_matrix` for one matrix ``W ≈ U @ V``.

    Attributes:
        u: ``[rows, r]``, sparse (and on its per-row grid with ``bits``). v: ``[r, cols]``, likewise.
        errors: relative error ``||W − UV||_F / ||W||_F`` of the projected SVD init, then after each PGD step.
        svd_error: relative error of the unconstrained truncated SVD at rank r (the floor without sparsity/bits).
    """

    u: Tensor
    v: Tensor
    errors: tuple[float, ...]
    svd_error: float

    @property
    def init_error(self) -> float:
        """Relative error of the projected (sparsified, quantized) truncated SVD: the naive baseline."""
        return self.errors[0]

    @property
    def error(self) -> float:
        """Relative error of the returned factors (the best iterate)."""
        return min(self.errors)


@torch.no_grad()
def decompose_matrix(
    weight: Tensor,
    rank: int,
    keep_u: int,
    keep_v: int,
    bits: int | None = None,
    steps: int = 300,
    lr: float | None = None,
) -> MatrixDecomposition:
    """Sparse (quantized) factors ``U @ V ≈ weight`` by projected gradient descent from the truncated SVD.

    See the module docstring for the algorithm. Computes in float32 (float64 for a float64 ``weight``).

    Args:
        weight: a finite 2-D matrix ``[rows, cols]``.
        rank: inner dimension r, in ``[1, min(rows, cols)]``.
        keep_u: maximal non-zeros of ``U`` (``[rows, r]``). keep_v: maximal non-zeros of ``V`` (``[r, cols]``).
        bits: ``None``, 8 or 4 (per-row symmetric grid of each factor).
        steps: PGD iterations (each a ``U`` step and a ``V`` step).
        lr: fixed step size, or ``None`` for the inverse Lipschitz constants ``1/||V||₂²``, ``1/||U||₂²``.

    Returns:
        The best iterate and the error trace.

    >>> torch.manual_seed(0) and None
    >>> w = torch.randn(40, 8) @ torch.randn(8, 60) + 0.1 * torch.randn(40, 60)
    >>> d = decompose_matrix(w, rank=8, keep_u=160, keep_v=240, bits=8, steps=100)
    >>> d.error < d.init_error, int(d.u.count_nonzero()) <= 160
    (True, True)
    """
    if weight.dim() != 2:
        raise ValueError(f"`weight` must be a 2-D matrix, got shape {tuple(weight.shape)}; reshape convs first.")
    rows, cols = weight.shape
    if not 1 <= rank <= min(rows, cols):
        raise ValueError(f"`rank` must be in [1, {min(rows, cols)}] for a {rows}×{cols} matrix, got {rank}.")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("`weight` has NaN or inf entries: it cannot be decomposed. Exclude the layer.")
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.detach().to(dtype)
    norm = float(torch.linalg.matrix_norm(w))
    scale = norm if norm > 0 else 1.0
    left, s, right_t = torch.linalg.svd(w, full_matrices=False)
    root = s[:rank].sqrt()
    svd_error = float(s[rank:].square().sum().sqrt()) / scale
    u = _project(left[:, :rank] * root, keep_u, bits)
    v = _project(root[:, None] * right_t[:rank], keep_v, bits)
    residual = u @ v - w
    errors = [float(torch.linalg.matrix_norm(residual)) / scale]
    best = (errors[0], u, v)
    for _ in range(steps):
        lipschitz = _spectral_sq(v @ v.T)
        if lipschitz > 0:
            u = _project(u - (lr or 1.0 / lipschitz) * (residual @ v.T), keep_u, bits)
            residual = u @ v - w
        lipschitz = _spectral_sq(u.T @ u)
        if lipschitz > 0:
            v = _project(v - (lr or 1.0 / lipschitz) * (u.T @ residual), keep_v, bits)
            residual = u @ v - w
        errors.append(float(torch.linalg.matrix_norm(residual)) / scale)
        if errors[-1] < best[0]:
            best = (errors[-1], u, v)
    return MatrixDecomposition(best[1].contiguous(), best[2].contiguous(), tuple(errors), svd_error)
