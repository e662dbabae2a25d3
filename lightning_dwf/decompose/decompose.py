"""The entry point of the decomposition: :func:`decompose_` replaces each selected weight of a plain module by
sparse, quantized factors ``U @ V`` in place, and reports what it did."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf.core.factorize import select_tensors
from lightning_dwf.decompose.config import DecomposeConfig
from lightning_dwf.decompose.io import U_SUFFIX, V_SUFFIX
from lightning_dwf.decompose.parametrization import LowRankProduct, register_decomposition
from lightning_dwf.decompose.projection import decompose_matrix
from lightning_dwf.decompose.report import DecompositionReport, LayerDecomposition
from lightning_dwf.export import encode_weight

__all__ = ["decompose_"]


def _factor_bytes(u: Tensor, v: Tensor, bits: int | None, name: str) -> int:
    """Payload bytes of both factors as :func:`save_decomposed` stores them (header excluded)."""
    total = 0
    for suffix, f in ((U_SUFFIX, u), (V_SUFFIX, v)):
        streams = encode_weight(f.detach().cpu(), bits, name + suffix).streams
        total += sum(s.nbytes for s in streams.values())
    return total


def decompose_(module: nn.Module, config: DecomposeConfig | None = None) -> DecompositionReport:
    """Replace each selected weight of a plain module by sparse, quantized factors ``U @ V``, in place.

    Every ``weight`` of a selected layer (``config``: layer types, ``include``/``exclude`` globs, ``filter_fn``)
    with at least ``min_size`` elements is decomposed by :func:`decompose_matrix` (Conv weights as
    ``[out, in/groups · prod(kernel)]``) and registered as a :class:`LowRankProduct` parametrization: the module
    keeps working, ``layer.weight`` is ``(U @ V).reshape(shape)`` and ``U``, ``V`` are trainable Parameters
    (fine-tune with :func:`finetune_` or any optimizer; the masks and the grid hold in the forward). Layers already
    decomposed are skipped.

    Args:
        module: a plain model (changed in place); DWF-factorized tensors must be collapsed first.
        config: see :class:`DecomposeConfig` (default: rank 0.25·min(out, in), density 0.1, 8 bits, 300 steps).

    Returns:
        Per layer: shape, rank, non-zeros, relative errors (SVD, projected SVD, PGD) and factor bytes.

    Raises:
        ValueError: a selected weight is parametrized by something else (e.g. DWF factors), or not finite; an
            ``include`` pattern matches nothing.

    >>> torch.manual_seed(0) and None
    >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    >>> report = decompose_(model, DecomposeConfig(rank=8, density=0.5, steps=50, exclude=["2"], min_size=0))
    >>> report.names, report.layers[0].nonzero_u <= 0.5 * 32 * 8, model(torch.randn(2, 64)).shape
    (('0.weight',), True, torch.Size([2, 4]))
    """
    config = config or DecomposeConfig()
    if not isinstance(config, DecomposeConfig):
        raise TypeError(f"`config` must be a DecomposeConfig, got {type(config).__name__}.")
    rows_out: list[LayerDecomposition] = []
    skipped: list[tuple[str, str]] = []
    for name, mod, pname in select_tensors(module, config):
        if parametrize.is_parametrized(mod, pname):
            plist = mod.parametrizations[pname]
            if len(plist) == 1 and isinstance(plist[0], LowRankProduct):
                skipped.append((name, "already decomposed"))
                continue
            raise ValueError(f"{name!r} is parametrized ({type(plist[0]).__name__}); QSD decomposes plain weights. "
                             "Call `lightning_dwf.collapse_(module)` first.")
        weight = getattr(mod, pname).detach()
        matrix = weight.reshape(weight.shape[0], -1)
        rows, cols = matrix.shape
        if weight.numel() < config.min_size:
            skipped.append((name, f"{weight.numel()} elements < min_size={config.min_size}"))
            continue
        rank = config.rank_for(rows, cols)
        keep_u, keep_v = config.keep_for(rows * rank), config.keep_for(rank * cols)
        if keep_u + keep_v >= weight.numel():
            skipped.append((name, f"factors would hold {keep_u + keep_v} values, the dense weight {weight.numel()}"))
            continue
        if keep_u == 0 or keep_v == 0:
            skipped.append((name, f"density={config.density} keeps no entry of a factor"))
            continue
        if not bool(torch.isfinite(matrix).all()):
            raise ValueError(f"{name!r} has NaN or inf entries: it cannot be decomposed. Add it to `exclude`.")
        result = decompose_matrix(matrix, rank, keep_u, keep_v, config.bits, config.steps, config.lr)
        register_decomposition(mod, pname, result.u, result.v, config.bits)
        rows_out.append(LayerDecomposition(
            name=name, shape=tuple(weight.shape), matrix=(rows, cols), rank=rank, bits=config.bits,
            nonzero_u=int(result.u.count_nonzero()), nonzero_v=int(result.v.count_nonzero()),
            numel_u=result.u.numel(), numel_v=result.v.numel(), svd_error=result.svd_error,
            init_error=result.init_error, error=result.error,
            stored_bytes=_factor_bytes(result.u, result.v, config.bits, name), dense_bytes=weight.numel() * 4,
            weight_sq_norm=float(matrix.double().square().sum()),
        ))
    return DecompositionReport(tuple(rows_out), tuple(skipped))
