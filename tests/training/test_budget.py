"""The cost model of the shrunk model: its prediction equals the shrunk model's MACs and parameters exactly, and
budget_masks meets a budget with as few groups dropped as possible."""

from __future__ import annotations

import pytest
import torch

from lightning_dwf import FactorizeConfig, collapse_, factorize_, gated_tensors, shrink_
from lightning_dwf.training.budget import CostModel, budget_masks, layer_macs
from lightning_dwf.training.support import zero_weights_

pytest.importorskip("torch_pruning")

from tests.inference.test_shrink import CASES, trained_like  # noqa: E402


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("measure, budget", [("macs", 0.5), ("macs", 0.2), ("params", 0.3)])
def test_budget_masks_meet_the_budget_and_the_prediction_is_exact(case, measure, budget):
    make, shape, exclude = CASES[case]
    model = trained_like(make)
    factorize_(model, 3, FactorizeConfig(structure="outputs", exclude=exclude))
    x = torch.randn(*shape)
    cost_model = CostModel(model, x)
    tensors = gated_tensors(model)
    masks = budget_masks(tensors, cost_model, budget, measure)
    dropped = {name: ~keep for name, keep in masks.items()}
    predicted = cost_model.cost(dropped, measure)
    assert predicted <= budget * cost_model.dense[measure]
    # one group fewer dropped would exceed the budget: the cut is tight
    order = sorted((float(t.unit_magnitudes()[i] / t.unit_magnitudes().pow(2).mean().sqrt()), t.name, i)
                   for t in tensors for i in range(t.groups) if dropped[t.name][i])
    _, name, i = order[-1]
    fewer = {n: d.clone() for n, d in dropped.items()}
    fewer[name][i] = False
    assert cost_model.cost(fewer, measure) > budget * cost_model.dense[measure]
    zero_weights_(model, masks)
    net = collapse_(model)
    shrink_(net, x)
    actual = sum(layer_macs(net, x).values()) if measure == "macs" else sum(p.numel() for p in net.parameters())
    assert actual == predicted
    assert cost_model.dense["params"] == sum(p.numel() for p in make().parameters())


@pytest.mark.parametrize("min_share", [0.0, 0.25])
def test_attention_heads_are_dropped_and_kept_together_and_the_prediction_is_exact(min_share):
    """The q/k/v heads of one attention module are one unit of the cut: every head dropped is dropped in all three
    (else it could not be removed), the protected head is the same in all three, and the shrunk cost is predicted."""
    from tests.inference.test_shrink import TinyTransformer

    model = trained_like(TinyTransformer)
    factorize_(model, 3, FactorizeConfig(structure={"attn.[qkv]": "heads", "embed": "outputs"}, num_heads=4,
                                         exclude=["head", "attn.out"]))
    x = torch.randn(2, 5, 6)
    cost_model = CostModel(model, x)
    assert [sorted(t) for t in cost_model.tied] == [["attn.k.weight", "attn.q.weight", "attn.v.weight"]]
    masks = budget_masks(gated_tensors(model), cost_model, 0.4, "macs", min_share=min_share)
    assert torch.equal(masks["attn.q.weight"], masks["attn.k.weight"])
    assert torch.equal(masks["attn.q.weight"], masks["attn.v.weight"])
    kept = int(masks["attn.q.weight"].sum())
    assert kept < 4 and (kept >= 1 or not min_share)
    predicted = cost_model.cost({name: ~keep for name, keep in masks.items()}, "macs")
    assert predicted <= 0.4 * cost_model.dense["macs"]
    zero_weights_(model, masks)
    net = collapse_(model)
    report = shrink_(net, x)
    assert net.attn.num_heads == max(kept, 1) and report.heads  # the shrink keeps one (zero) head of none
    assert sum(layer_macs(net, x).values()) == predicted


def test_a_head_already_zero_in_one_projection_does_not_drop_the_others():
    """A q head below the floor is zero already; with nothing to cut, k's and v's same head stay."""
    from tests.inference.test_shrink import TinyTransformer

    model = trained_like(TinyTransformer)
    with torch.no_grad():
        model.attn.q.weight[:4] *= 1e-6
        model.attn.q.bias[:4] *= 1e-6
    factorize_(model, 3, FactorizeConfig(structure={"attn.[qkv]": "heads"}, num_heads=4,
                                         exclude=["head", "attn.out", "embed"]))
    x = torch.randn(2, 5, 6)
    masks = budget_masks(gated_tensors(model), CostModel(model, x), 1.0, "macs", floor=1e-4)
    assert masks["attn.q.weight"].tolist() == [False, True, True, True]
    assert bool(masks["attn.k.weight"].all()) and bool(masks["attn.v.weight"].all())


def test_cuts_along_a_ramp_drop_the_fewest_groups_that_fit():
    """Cut after cut with a falling budget (as the ramp does, the earlier cut's groups zero already): each cut drops
    the fewest groups that meet the budget, the same number an exhaustive scan over the ranking finds."""
    make, shape, exclude = CASES[next(iter(CASES))]
    model = trained_like(make)
    factorize_(model, 3, FactorizeConfig(structure="outputs", exclude=exclude))
    x = torch.randn(*shape)
    cost_model = CostModel(model, x)
    limit_of = cost_model.dense["macs"]
    for budget in (0.95, 0.9, 0.7, 0.69, 0.5, 0.3, 0.3, 0.1):
        tensors = gated_tensors(model)
        masks = budget_masks(tensors, cost_model, budget, "macs", floor=1e-12)
        dropped = {name: ~keep for name, keep in masks.items()}
        assert cost_model.cost(dropped, "macs") <= budget * limit_of
        before = {t.name: t.unit_magnitudes() < 1e-12 for t in tensors}
        ranked = sorted((float(t.unit_magnitudes()[i] / t.unit_magnitudes().pow(2).mean().sqrt()), t.name, i)
                        for t in tensors for i in range(t.groups) if not before[t.name][i])
        fewest, trial = 0, {n: d.clone() for n, d in before.items()}
        while cost_model.cost(trial, "macs") > budget * limit_of:
            _, name, i = ranked[fewest]
            trial[name][i] = True
            fewest += 1
        assert sum(int((dropped[n] & ~before[n]).sum()) for n in dropped) == fewest
        zero_weights_(model, masks)
