"""Fixing the sparsity pattern (support) of a factorized model: which weights are zero, exactly.

Target mode (``DWFCallback(target_sparsity=...)``) lets the penalty choose *where* the zeros go, then fixes that
support and trains the surviving weights without penalty (the "recovery" phase): the same sparsity, without the
shrinkage bias the penalty puts on the survivors. A weight whose D factors are all exactly zero stays zero under
any gradient-based optimizer: each factor's gradient is the loss gradient times the product of the other factors
(zero), the penalty gradient is proportional to the factor (zero), and the entry's optimizer state is reset here
(momenta to 0; :mod:`lightning_dwf.core.unit_state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from lightning_dwf.config import DEFAULT_MIN_LAYER_SHARE
from lightning_dwf.core.factorize import sparse_tensors
from lightning_dwf.core.gating import GatedTensor, relative_scores
from lightning_dwf.core.sharding import full_tensor, global_count, global_sum


@torch.no_grad()
def support_threshold(weights: Sequence[Tensor], target: float, floor: float = 0.0) -> float:
    """The global magnitude threshold at which ``weights`` have sparsity ``target`` (never below ``floor``).

    Weights with ``|w| < threshold`` are the ``round(target · n)`` smallest ones (ties aside). The ``floor``
    (absolute) keeps weights that are already numerically zero from being counted as survivors.

    >>> support_threshold([torch.tensor([0.1, -0.4, 0.3, 0.2])], target=0.5)
    0.30000001192092896
    """
    magnitudes = torch.cat([w.detach().abs().flatten().float() for w in weights])
    k = int(round(target * magnitudes.numel()))
    if k <= 0:
        return floor
    values = torch.sort(magnitudes).values
    return max(floor, float(values[min(k, values.numel() - 1)]))




@torch.no_grad()
def keep_masks(
    weights: Mapping[str, Tensor], target: float, floor: float = 0.0, min_share: float = DEFAULT_MIN_LAYER_SHARE
) -> dict[str, Tensor]:
    """Which weights survive a global magnitude cut to sparsity ``target``, without emptying any tensor.

    Exactly ``n − round(target · n)`` weights are kept over all tensors (``n`` weights in all): the largest by
    magnitude, except that every tensor first keeps its ``ceil(min_share · (1 − target) · n_t)`` largest (at least
    one), a tenth of its uniform share by default. Weights with ``|w| < floor`` (absolute) are never kept: they are
    numerically zero already, so the sparsity can exceed ``target`` only by those.

    Args:
        weights: the collapsed weights by name. target: the fraction to cut. floor: see above.
        min_share: the per-tensor minimum as a fraction of the tensor's uniform share (0: a pure global cut, which can
            empty a tensor).

    >>> masks = keep_masks({"a": torch.tensor([0.1, -0.4, 0.3, 0.2]), "b": torch.tensor([0.01, 0.02])}, target=0.5)
    >>> masks["a"].tolist(), masks["b"].tolist()
    ([False, True, True, False], [False, True])
    """
    names = list(weights)
    sizes = [weights[n].numel() for n in names]
    total = sum(sizes)
    keep = total - int(round(target * total))
    magnitudes = torch.cat([weights[n].detach().abs().flatten().float() for n in names])
    # only weights at or above the floor can be kept, and each ranks above every weight below it: the selections run
    # among them (after the first cuts most weights are zero, so that is a fraction of the work)
    eligible = magnitudes >= floor
    forced = [layer_minimum(size, 1.0 - target, min_share) if keep and min_share else 0 for size in sizes]
    mask = _largest(magnitudes, eligible, keep)
    kept = [int(m.count_nonzero()) for m in torch.split(mask, sizes)] if any(forced) else forced
    if any(k < f for k, f in zip(kept, forced, strict=True)):
        # a tensor would keep less than its minimum: its largest are kept first, the rest compete globally. (When
        # every tensor keeps its minimum anyway, its largest are among the global cut's and the result is the same.)
        ranked, start = magnitudes.clone(), 0
        for size, count in zip(sizes, forced, strict=True):
            if count:
                chunk = ranked[start:start + size]
                among = eligible[start:start + size].nonzero().flatten()
                if among.numel() >= count:
                    chunk[among[torch.topk(chunk[among], count, sorted=False).indices]] = math.inf
                else:
                    chunk[torch.topk(chunk, count, sorted=False).indices] = math.inf
            start += size
        mask = _largest(ranked, eligible | (ranked == math.inf), keep) & eligible
    return {n: m.view_as(weights[n]) for n, m in zip(names, torch.split(mask, sizes), strict=True)}


def layer_minimum(size: int, density: float, min_share: float) -> int:
    """The per-layer guard: the units a tensor of ``size`` units always keeps, ``min_share`` of its uniform share
    ``density · size`` of the survivors, at least one (and at most all).

    >>> layer_minimum(1000, 0.02, 0.1), layer_minimum(150, 0.005, 0.1)
    (2, 1)
    """
    return min(size, max(1, math.ceil(min_share * density * size - 1e-9)))


#: Eligible weights above which :func:`_largest` brackets the boundary from a sample before selecting exactly.
SAMPLED_SELECTION = 1 << 20
_SAMPLE = 1 << 16


def _largest(values: Tensor, eligible: Tensor, keep: int) -> Tensor:
    """A mask of the ``keep`` largest ``values`` among the ``eligible`` ones (all of them when fewer): a selection of
    the smaller side, the ``keep`` largest or the rest's smallest. Past :data:`SAMPLED_SELECTION` eligible values the
    boundary is first bracketed from a fixed sample, so the exact selection runs over the values near it only."""
    count = int(eligible.count_nonzero())
    if count <= keep:
        return eligible.clone()
    if keep == 0:
        return torch.zeros_like(eligible)
    if count > SAMPLED_SELECTION:
        mask = _bracketed_largest(values, eligible, keep, count)
        if mask is not None:
            return mask
    mask = eligible.clone()
    candidates = eligible.nonzero().flatten()
    drop = count - keep
    if drop < keep:
        mask[candidates[torch.topk(values[candidates], drop, largest=False, sorted=False).indices]] = False
        return mask
    mask[:] = False
    mask[candidates[torch.topk(values[candidates], keep, sorted=False).indices]] = True
    return mask


def _bracketed_largest(values: Tensor, eligible: Tensor, keep: int, count: int) -> Tensor | None:
    """:func:`_largest` through a band ``[low, high]`` around the boundary estimated from a fixed sample: everything
    above ``high`` is kept, and the rest of ``keep`` is selected exactly inside the band. ``None`` when the band
    misses the boundary (then the full selection runs)."""
    generator = torch.Generator(device=values.device).manual_seed(0)
    at = torch.randint(values.numel(), (_SAMPLE,), generator=generator, device=values.device)
    sample = values[at][eligible[at]].sort().values
    if sample.numel() < _SAMPLE // 16:
        return None
    share = 1.0 - keep / count  # the boundary's quantile among the eligible values
    slack = 6.0 * math.sqrt(share * (1.0 - share) / sample.numel()) + 4.0 / sample.numel()
    last = sample.numel() - 1
    low = sample[max(0, math.floor((share - slack) * last))]
    high = sample[min(last, math.ceil((share + slack) * last))]
    above = eligible & (values > high)
    band = (eligible & (values >= low) & ~above).nonzero().flatten()
    wanted = keep - int(above.count_nonzero())
    if wanted < 0 or wanted > band.numel():
        return None
    if wanted:
        above[band[torch.topk(values[band], wanted, sorted=False).indices]] = True
    return above


@torch.no_grad()
def cut_to_sparsity_(
    module: nn.Module,
    target: float,
    floor: float = 0.0,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    min_share: float = DEFAULT_MIN_LAYER_SHARE,
    score: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """Zero the factors of all but the surviving weights of :func:`keep_masks` (with their optimizer state).

    Units are weights of factorized tensors and groups of gated ones; ``target`` is the fraction of units cut. With
    gated tensors in the model every unit is ranked by its magnitude relative to its tensor's RMS
    (:func:`~lightning_dwf.core.gating.relative_scores`), else by its magnitude; ``score`` replaces that ranking: a
    function of one tensor's unit magnitudes to their scores (the largest survive; units below ``floor`` never do).
    Sharded factors (FSDP2): the cut is chosen on the gathered weights, so every rank keeps the same weights as an
    unsharded run would, and each rank zeroes its own shards.

    Returns:
        The smallest surviving magnitude (absolute; ``inf`` if none survives): the effective cut threshold.
    """
    tensors = sparse_tensors(module)
    weights = {t.name: full_tensor(t.unit_magnitudes()) for t in tensors}
    # groups are ranked relative to their tensor's scale (a BatchNorm's channels and a Linear layer's rows differ by
    # orders of magnitude), and so is everything in a model that mixes groups and weights; below the floor stays out
    if score is None and any(isinstance(t, GatedTensor) for t in tensors):
        score = relative_scores
    scores = {n: score(w).masked_fill(w < floor, 0.0) if score is not None else w for n, w in weights.items()}
    masks = keep_masks(scores, target, floor, min_share)
    zero_weights_(module, masks, optimizers)
    smallest = [torch.where(m, weights[n], math.inf).min() for n, m in masks.items() if m.numel()]  # magnitudes: >= 0
    return float(torch.stack(smallest).min()) if smallest else math.inf


@torch.no_grad()
def fix_support_(
    module: nn.Module,
    threshold: float | Mapping[str, float],
    optimizers: Iterable[torch.optim.Optimizer] = (),
    min_share: float = 0.0,
    guarded: set[str] | None = None,
) -> int:
    """Set every factor of each factorized weight with ``|w| < threshold`` (absolute) to exactly zero.

    The optimizers' per-parameter state tensors of the factors' shape are reset at the same entries (momentum
    buffers and first moments to 0, so momentum cannot move them off zero; second moments to 1, see
    :mod:`lightning_dwf.core.unit_state`). Only entries not zeroed yet are written (those
    whose first factor is not 0: a zeroed weight has every factor 0, and the other factors of a weight whose first
    factor is 0 get no gradient), so this is cheap enough to run every step, as the callback's proximal step does.

    Args:
        module: a factorized model (changed in place).
        threshold: one magnitude for every factorized tensor, or one per tensor name (tensors not named are left
            alone).
        optimizers: whose state is reset with the factors.
        min_share: the per-layer guard (0: none): a tensor left with fewer than ``ceil(min_share · d · n)`` units at or
            above its threshold (at least one; ``d`` the fraction of the named tensors' units left, ``n`` the
            tensor's units) keeps that many of its largest instead, the rule of :func:`keep_masks` with the density
            reached in place of the target's.
        guarded: if given, the names of the tensors the guard kept at their minimum are added to it (the callback
            exempts them from the penalty at the next step, or the shrink would take the weights it kept).

    Returns:
        The number of weights zero now among those below their threshold.
    """
    states = [opt.state for opt in optimizers]
    chosen = []
    for tensor in sparse_tensors(module):
        tau = threshold.get(tensor.name) if isinstance(threshold, Mapping) else threshold
        if tau is not None:
            magnitudes = tensor.unit_magnitudes()
            chosen.append((tensor, magnitudes, magnitudes < tau))
    if not (min_share and chosen):
        below: list[Tensor] = []  # counted at the end: one reduction over the ranks when sharded
        for tensor, _, dead in chosen:
            below.append(dead.sum())
            tensor.zero_units_(dead, states)  # it skips the units zeroed already
        return global_sum(below)
    sizes = [m.numel() for _, m, _ in chosen]
    counts = [global_count(dead) for _, _, dead in chosen]  # the guard needs them now: the return reuses them
    density = sum(size - count for size, count in zip(sizes, counts, strict=True)) / max(1, sum(sizes))
    for i, (tensor, magnitudes, dead) in enumerate(chosen):
        minimum = layer_minimum(sizes[i], density, min_share)
        if sizes[i] - counts[i] < minimum:  # its largest stay, below the threshold or not (the whole mask: sharded too)
            if guarded is not None:
                guarded.add(tensor.name)
            full = full_tensor(magnitudes)
            dead = torch.ones_like(full, dtype=torch.bool)
            dead.view(-1)[torch.topk(full.flatten(), minimum, sorted=False).indices] = False
            counts[i] = sizes[i] - minimum
        tensor.zero_units_(dead, states)  # it skips the units zeroed already
    return sum(counts)


@torch.no_grad()
def zero_weights_(
    module: nn.Module, keep: Mapping[str, Tensor], optimizers: Iterable[torch.optim.Optimizer] = ()
) -> int:
    """Set all D factors of every weight where ``keep[name]`` is False to exactly zero, with their optimizer state.

    Args:
        module: a factorized model (changed in place).
        keep: boolean masks of the weights' shapes, by factorized tensor name; tensors not named are left alone.
        optimizers: whose per-parameter state tensors of the factors' shape are reset at the same entries (momenta to
            0, second moments to 1: :mod:`lightning_dwf.core.unit_state`).

    Returns:
        The number of weights outside ``keep`` (zero now).
    """
    states = [opt.state for opt in optimizers]
    zeroed = 0
    for tensor in sparse_tensors(module):
        mask = keep.get(tensor.name)
        if mask is not None:
            zeroed += tensor.zero_units_(~mask, states)
    return zeroed
