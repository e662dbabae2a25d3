"""Fixing the support (``lightning_dwf.training.support``): the threshold that meets a target, ``fix_support_`` keeping
the pattern exactly under SGD and Adam, and ``keep_masks``' exact count with a minimum per layer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightning_dwf import keep_masks
from lightning_dwf.core.factorize import factorize_, factorized_tensors
from lightning_dwf.training.support import cut_to_sparsity_, fix_support_, support_threshold


def test_support_threshold_closes_the_gap_both_ways():
    w = [torch.tensor([0.0, 1e-5, 2e-3, 0.1, 0.5]), torch.tensor([0.2, 3e-3, 1.0, 0.7, 4e-4])]
    for target in (0.3, 0.5, 0.7):  # below, at and above the 4 weights under 1e-2
        t = support_threshold(w, target, floor=1e-7)
        assert sum(int((x.abs() < t).sum()) for x in w) == round(target * 10)
    assert support_threshold(w, 0.05, floor=1e-7) == 1e-7  # never keeps a numerically zero weight


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_fixed_support_stays_exactly_zero(optimizer):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    factorize_(net, 3)
    opt = (
        torch.optim.SGD(net.parameters(), lr=0.5, momentum=0.9)
        if optimizer == "sgd"
        else torch.optim.Adam(net.parameters(), lr=0.05, weight_decay=1e-3)
    )
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()

    steps(5)  # optimizer state (momentum, Adam moments) is non-zero everywhere
    weights = [t.product() for t in factorized_tensors(net)]
    threshold = support_threshold(weights, 0.75)
    zeroed = fix_support_(net, threshold, [opt])
    assert zeroed == sum(int((w.abs() < threshold).sum()) for w in weights)
    masks = [t.product() == 0 for t in factorized_tensors(net)]
    assert sum(int(m.sum()) for m in masks) == zeroed
    steps(20)
    for t, m in zip(factorized_tensors(net), masks):
        assert bool((t.product()[m] == 0).all())  # the pattern is kept exactly
        assert bool((t.product()[~m] != 0).all())  # the survivors still train


def test_keep_masks_exact_count_and_layer_minimum():
    torch.manual_seed(0)
    weights = {"big": torch.randn(100, 50), "small": 1e-4 * torch.randn(10, 10), "one": torch.randn(3)}
    n = sum(w.numel() for w in weights.values())
    for target in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        masks = keep_masks(weights, target)
        kept = sum(int(m.sum()) for m in masks.values())
        assert kept == n - round(target * n), target
        if target < 1.0:
            assert all(bool(m.any()) for m in masks.values()), target
    pure = keep_masks(weights, 0.9, min_share=0.0)
    assert not bool(pure["small"].any())  # a pure global cut empties the small-scale tensor
    masks = keep_masks(weights, 0.9)
    assert int(masks["small"].sum()) == 1  # a tenth of its share of 10 survivors
    # survivors of the global part are the largest of the rest
    big = weights["big"].abs()
    assert float(big[masks["big"]].min()) >= float(big[~masks["big"]].max())


def _reference_keep_masks(weights, target, floor, min_share):
    """The rule of ``keep_masks`` written plainly: every tensor's minimum first, then the largest over all, never a
    weight below the floor."""
    names = list(weights)
    flat = torch.cat([weights[n].abs().flatten() for n in names])
    sizes = [weights[n].numel() for n in names]
    keep = flat.numel() - round(target * flat.numel())
    ranked, start = flat.clone(), 0
    for size in sizes:
        forced = min(size, max(1, math.ceil(min_share * (1 - target) * size - 1e-9))) if keep and min_share else 0
        if forced:
            chunk = ranked[start:start + size]
            chunk[torch.topk(chunk, forced).indices] = math.inf
        start += size
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    if keep:
        mask[torch.topk(ranked, keep).indices] = True
    mask &= flat >= floor
    return dict(zip(names, torch.split(mask, sizes), strict=True))


@pytest.mark.parametrize("target", [0.0, 0.3, 0.9, 0.999])
@pytest.mark.parametrize("min_share", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("zeros", [0.0, 0.5, 0.95])
def test_keep_masks_equal_the_plain_rule(target, min_share, zeros):
    """The selection among weights above the floor, and the minimum per tensor applied only where it binds, give
    exactly the plain rule's masks (distinct magnitudes; weights already zero below the floor)."""
    generator = torch.Generator().manual_seed(int(100 * target + 10 * min_share + zeros * 7))
    weights = {name: torch.randn(*shape, generator=generator) * scale
               for name, shape, scale in (("a", (40, 30), 1.0), ("b", (20, 10), 1e-3), ("c", (7,), 10.0))}
    for w in weights.values():
        w[torch.rand(w.shape, generator=generator) < zeros] = 0.0
    fast = keep_masks(weights, target, floor=1e-6, min_share=min_share)
    plain = _reference_keep_masks(weights, target, 1e-6, min_share)
    assert all(torch.equal(fast[n].flatten(), plain[n]) for n in weights)


@pytest.mark.parametrize("target", [0.1, 0.5, 0.9, 0.99])
def test_keep_masks_through_a_sampled_band_equal_the_plain_rule(monkeypatch, target):
    """Past the size where the boundary is bracketed from a sample first, the masks are still the plain rule's."""
    import lightning_dwf.training.support as support

    monkeypatch.setattr(support, "SAMPLED_SELECTION", 1000)
    generator = torch.Generator().manual_seed(3)
    weights = {"a": torch.randn(300, 200, generator=generator), "b": 1e-2 * torch.randn(100, 50, generator=generator)}
    weights["a"][:40] = 0.0
    fast = keep_masks(weights, target, floor=1e-6, min_share=0.1)
    plain = _reference_keep_masks(weights, target, 1e-6, 0.1)
    assert all(torch.equal(fast[n].flatten(), plain[n]) for n in weights)


@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_cut_to_sparsity_ranks_by_a_given_score(target):
    """``score`` replaces the magnitude ranking: with a score that falls with the magnitude the smallest weights
    survive, the count is still exact, and the value returned is the smallest survivor's magnitude."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    factorize_(net, 3)
    default = copy.deepcopy(net)
    before = torch.cat([t.product().detach().abs().flatten() for t in factorized_tensors(net)])

    def kept(model):
        return torch.cat([t.product().detach().flatten() for t in factorized_tensors(model)]) != 0

    smallest = cut_to_sparsity_(net, target, min_share=0.0, score=lambda w: 1.0 / (w + 1.0))
    inverted = kept(net)
    assert int((~inverted).sum()) == round(target * before.numel())
    assert float(before[inverted].max()) < float(before[~inverted].min())  # every survivor below every cut weight
    assert smallest == float(before[inverted].min())
    largest = cut_to_sparsity_(default, target, min_share=0.0)  # the default ranking keeps the largest
    assert float(before[kept(default)].min()) > float(before[~kept(default)].max())
    assert largest == float(before[kept(default)].min())
