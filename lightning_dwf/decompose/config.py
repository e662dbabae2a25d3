"""The settings of the decomposition: which weights (the shared :class:`~lightning_dwf.config.SelectionConfig`) and
the budget of their factors (rank, density, bits) and of the projected gradient descent that finds them."""

from __future__ import annotations

import math
from dataclasses import dataclass

from lightning_dwf._validation import check_bits, check_int, check_positive, set_field
from lightning_dwf.config import SelectionConfig

__all__ = ["DEFAULT_RANK_RATIO", "DecomposeConfig"]

#: ``rank_ratio`` used when neither ``rank`` nor ``rank_ratio`` is given.
DEFAULT_RANK_RATIO = 0.25


@dataclass(frozen=True, kw_only=True)
class DecomposeConfig(SelectionConfig):
    """What to decompose (the fields of :class:`~lightning_dwf.config.SelectionConfig`) and how (Quantized Sparse
    Weight Decomposition, see :mod:`lightning_dwf.decompose`).

    Construct it with keywords; the selection fields come from the shared base, so the layers are chosen exactly
    as :class:`~lightning_dwf.FactorizeConfig` chooses them.

    Args:
        rank: the inner dimension r of ``U @ V`` for every layer (capped at ``min(out, cols)``). Give either
            ``rank`` or ``rank_ratio``, not both.
        rank_ratio: r as a fraction of ``min(out, cols)`` in (0, 1], rounded, at least 1 (default 0.25 when
            ``rank`` is not given either).
        density: fraction of entries kept non-zero in EACH factor, in (0, 1]: at most ``floor(density · numel)``
            non-zeros in ``U`` and in ``V`` (e.g. 0.1).
        bits: ``None`` (float factors), 8 or 4: the factors' values lie on the per-row symmetric grid
            ``scale_r = max_j |x_rj| / (2**(bits-1) - 1)`` of :mod:`lightning_dwf.export`.
        steps: projected-gradient iterations (each updates ``U`` then ``V``); 0 keeps the projected SVD.
        lr: a fixed PGD step size; ``None`` (default, recommended) uses ``1/||V||₂²`` for ``U`` and ``1/||U||₂²``
            for ``V``, the inverse Lipschitz constants of the two subproblems (no tuning needed).
        layer_types: layer classes or ``torch.nn`` names whose ``weight`` is decomposed (default Linear,
            Conv1d/2d/3d).
        include: glob patterns of qualified module names to decompose (default: every layer of ``layer_types``).
        exclude: glob patterns of module names to keep dense (e.g. ``["classifier", "features.0"]``).
        param_names: must stay ``("weight",)``: only weights are decomposed (a bias has no matrix to factor).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, a last say on each selected layer.
        min_size: weights with fewer elements are left dense. Independently of it, a layer is left dense when its
            two factors would hold at least as many values as the weight itself.

    >>> DecomposeConfig(rank=16, density=0.2).rank_for(300, 784)
    16
    >>> DecomposeConfig(rank_ratio=0.1).rank_for(300, 784)
    30
    >>> DecomposeConfig(density=1.5)
    Traceback (most recent call last):
    ...
    ValueError: `density` is the fraction of non-zeros kept in each factor; it must be in (0, 1], got 1.5.
    """

    rank: int | None = None
    rank_ratio: float | None = None
    density: float = 0.1
    bits: int | None = 8
    steps: int = 300
    lr: float | None = None
    min_size: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.param_names != ("weight",):
            raise ValueError(f"`param_names` must be ('weight',) for the decomposition (only weights are factored "
                             f"into U @ V), got {self.param_names!r}. Leave it unset.")
        if self.rank is not None and self.rank_ratio is not None:
            raise ValueError(f"Give either `rank` ({self.rank!r}) or `rank_ratio` ({self.rank_ratio!r}), not both.")
        if self.rank is not None:
            check_int("rank", self.rank, 1, " E.g. rank=32, or rank_ratio=0.25 for a quarter of min(out, in).")
        else:
            ratio = DEFAULT_RANK_RATIO if self.rank_ratio is None else self.rank_ratio
            ratio = check_positive("rank_ratio", ratio, " It is a fraction of min(out, in), e.g. 0.25.")
            if ratio > 1:
                raise ValueError(f"`rank_ratio` is a fraction of min(out, in) in (0, 1], got {ratio}. For an "
                                 "absolute rank use `rank=`.")
            set_field(self, "rank_ratio", ratio)
        density = self.density
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ValueError(f"`density` is the fraction of non-zeros kept in each factor; it must be in (0, 1], "
                             f"got {density!r}.")
        set_field(self, "density", float(density))
        check_bits(self.bits, "bits")
        check_int("steps", self.steps, 0, " E.g. 300; 0 keeps the projected truncated SVD.")
        if self.lr is not None:
            set_field(self, "lr", check_positive("lr", self.lr, " Leave it None for the Lipschitz step 1/||V||²."))
        check_int("min_size", self.min_size, 0, " It is a number of weight elements, e.g. 1024; 0 disables it.")

    def rank_for(self, rows: int, cols: int) -> int:
        """The rank r used for a ``[rows, cols]`` matrix (at most ``min(rows, cols)``, at least 1)."""
        full = min(rows, cols)
        if self.rank is not None:
            return min(self.rank, full)
        return max(1, min(full, round(self.rank_ratio * full)))

    def keep_for(self, numel: int) -> int:
        """Non-zeros kept in a factor of ``numel`` elements: ``floor(density · numel)`` (a tolerance of 1e-9)."""
        return min(numel, math.floor(self.density * numel + 1e-9))
