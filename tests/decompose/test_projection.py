"""decompose_matrix: PGD quality against the projected SVD, exact budgets and grids."""

from __future__ import annotations

import pytest
import torch

from lightning_dwf.decompose import decompose_matrix

from .helpers import assert_on_grid, low_rank_plus_noise


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_pgd_lowers_the_error_and_beats_projected_svd(bits: int | None) -> None:
    w = low_rank_plus_noise()
    d = decompose_matrix(w, rank=10, keep_u=48 * 10 // 4, keep_v=10 * 64 // 4, bits=bits, steps=150)
    err = float(torch.linalg.matrix_norm(w - d.u @ d.v) / torch.linalg.matrix_norm(w))
    assert err == pytest.approx(d.error, rel=1e-4)
    assert d.svd_error < d.error < 0.97 * d.init_error  # the naive baseline: magnitude-sparsified (quantized) SVD
    assert min(d.errors[:20]) > d.error or d.errors.index(d.error) < 20  # still improving after 20 steps, or done
    if bits is None:  # exact projection onto the sparse set: iterative hard thresholding never increases f
        assert all(b <= a * (1 + 1e-5) for a, b in zip(d.errors, d.errors[1:]))
    assert int(d.u.count_nonzero()) <= 120 and int(d.v.count_nonzero()) <= 160
    if bits is not None:
        assert_on_grid(d.u, bits)
        assert_on_grid(d.v, bits)


def test_pgd_with_a_fixed_step_and_zero_steps() -> None:
    w = low_rank_plus_noise()
    fixed = decompose_matrix(w, rank=10, keep_u=120, keep_v=160, steps=50, lr=0.05)
    assert fixed.error < fixed.init_error
    none = decompose_matrix(w, rank=10, keep_u=120, keep_v=160, steps=0)
    assert len(none.errors) == 1 and none.error == none.init_error
    with pytest.raises(ValueError, match="`rank`"):
        decompose_matrix(w, rank=0, keep_u=1, keep_v=1)
    with pytest.raises(ValueError, match="NaN"):
        decompose_matrix(torch.full((4, 4), float("nan")), rank=2, keep_u=2, keep_v=2)
