"""Structured DWF (D-Gating): group layouts, the gated parametrization, balance and the group-penalty identity, the
coupled bias and BatchNorm, collapse in place and on a state dict."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lightning_dwf import (
    FactorizeConfig,
    collapse_,
    collapse_state_dict,
    factor_parameters,
    factorize_,
    gated_tensors,
    sparsity_report,
)
from lightning_dwf.core.groups import GroupLayout
from lightning_dwf.training.support import cut_to_sparsity_, fix_support_


def group_lasso_value(weights, layouts, depth: int) -> float:
    """Σ_g ‖w_g‖₂^(2/D) from the collapsed tensors (an independent reference for the report and the penalty)."""
    sq = sum(layout.grouped(w.detach()).double().pow(2).sum(dim=1) for w, layout in zip(weights, layouts, strict=True))
    return float(sq.sqrt().pow(2.0 / depth).sum())


def conv_bn_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16),
                        nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].bias.uniform_(-1, 1)
    return net.eval()


@pytest.mark.parametrize("layout, shape", [
    (GroupLayout(0, 6), (6, 5)),
    (GroupLayout(0, 6), (6,)),  # a coupled bias: the scale itself
    (GroupLayout(1, 5), (6, 5, 3, 3)),
    (GroupLayout(0, 2, width=3, blocks=3), (18, 4)),
    (GroupLayout(0, 2, width=3, blocks=3), (18,)),
])
def test_layout_groups_and_expand_agree(layout, shape):
    """``expand`` of a one-hot group scale marks exactly the entries ``grouped`` puts in that group's row."""
    t = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)
    rows = layout.grouped(t)
    assert rows.shape == (layout.groups, layout.entries(shape))
    for g in range(layout.groups):
        onehot = torch.zeros(layout.groups)
        onehot[g] = 1
        expanded = layout.expand(onehot, shape)
        assert expanded.dim() == len(shape) and expanded.shape[layout.dim] == shape[layout.dim]
        mask = expanded.expand(shape).bool()
        assert sorted(t[mask].tolist()) == sorted(rows[g].tolist())


@pytest.mark.parametrize("depth", [2, 3, 4])
def test_gating_keeps_the_function_and_the_penalty_identity_holds_at_balance(depth):
    """Gating a trained model keeps its outputs; at the balanced start the L2 penalty on ω and the gates equals the
    group penalty Σ_g ‖w_g‖^(2/D) in closed form (the group lasso for D = 2)."""
    net = conv_bn_mlp()
    x = torch.randn(4, 3, 8, 8)
    before = net(x)
    names = factorize_(net, depth, FactorizeConfig(structure="outputs", exclude=["6"]))
    assert names == ["1.weight", "4.weight"]  # the Conv's filters are gated through its BatchNorm
    torch.testing.assert_close(net(x), before, atol=1e-6, rtol=1e-5)
    for t in gated_tensors(net):
        assert all(g.dim() == 1 and g.numel() == t.groups for g in t.gates)  # 1-D gates (FSDP2 refuses 0-d ones)
        values = t.values()
        group = group_lasso_value(values, [t.layout] * len(values), depth)
        factor_sq = sum(float(p.detach().double().pow(2).sum()) for p in t.factors)
        assert factor_sq / depth == pytest.approx(group, rel=1e-5)
        assert abs(t.misalignment()) < 1e-5 * group
        layer = next(entry for entry in sparsity_report(net).layers if entry.name == t.name)
        assert layer.l2d == pytest.approx(group, rel=1e-5) and layer.misalignment < 1e-5 * group
        assert layer.groups == t.groups and layer.numel == t.entries * t.groups
    if depth == 2:  # the group lasso: Σ_g ‖w_g‖₂
        t = gated_tensors(net)[1]
        rows = torch.cat([t.product(), net[4].bias[:, None]], dim=1).detach()
        lasso = group_lasso_value(t.values(), [t.layout] * 2, 2)
        assert lasso == pytest.approx(float(rows.norm(dim=1).sum()), rel=1e-5)


def test_zero_gates_silence_the_group_and_collapse_matches_the_state_dict():
    """A zero gate zeroes the group's weights, bias and BatchNorm shift; collapse_ and collapse_state_dict agree with
    the factorized model and load into the plain class."""
    net = conv_bn_mlp()
    plain = copy.deepcopy(net)
    factorize_(net, 3, FactorizeConfig(structure="outputs", include=["0", "4"]))
    for t in gated_tensors(net):
        with torch.no_grad():
            t.gates[0][: t.groups // 2] = 0
    x = torch.randn(4, 3, 8, 8)
    expected = net(x)
    plain.load_state_dict(collapse_state_dict(net.state_dict()))
    torch.testing.assert_close(plain(x), expected)
    assert int((plain[4].weight.abs().sum(1) == 0).sum()) == 8 and int((plain[4].bias == 0).sum()) >= 8
    assert int(((plain[1].weight == 0) & (plain[1].bias == 0)).sum()) == 4
    collapsed = collapse_(copy.deepcopy(net))
    assert type(collapsed[4]) is nn.Linear and type(collapsed[1]) is nn.BatchNorm2d
    torch.testing.assert_close(collapsed(x), expected)
    assert collapsed.state_dict().keys() == plain.state_dict().keys()


def test_support_operations_act_on_whole_groups():
    """fix_support_ zeroes groups whose RMS is below the threshold, cut_to_sparsity_ keeps the largest groups (a
    fraction of groups), and the optimizer state of dropped groups is zeroed too."""
    torch.manual_seed(2)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    factorize_(net, 3, FactorizeConfig(structure="outputs", exclude=["2"]))
    (t,) = gated_tensors(net)
    opt = torch.optim.Adam(factor_parameters(net), lr=1e-3)
    net(torch.randn(5, 6)).sum().backward()
    opt.step()
    rms = t.unit_magnitudes()
    threshold = float(rms.sort().values[3])  # three groups below
    assert fix_support_(net, threshold, [opt]) == 3
    assert int((t.scale() == 0).sum()) == 3
    dead = t.scale() == 0
    assert bool((opt.state[t.omega]["exp_avg"][dead] == 0).all())
    assert bool((opt.state[t.gates[0]]["exp_avg"][dead] == 0).all())
    cut_to_sparsity_(net, 0.6, optimizers=[opt])
    assert int((t.scale() == 0).sum()) == 6 and int((t.product().abs().sum(1) == 0).sum()) == 6


def test_heads_of_multihead_attention_are_gated_with_their_bias():
    """``structure="heads"`` gates nn.MultiheadAttention's packed q/k/v rows per head; a zero gate zeroes the head's
    rows in q, k and v and its bias."""
    torch.manual_seed(3)
    attn = nn.MultiheadAttention(8, 4, batch_first=True)
    x = torch.randn(2, 5, 8)
    before = attn(x, x, x)[0]
    assert factorize_(attn, 3, FactorizeConfig(structure="heads")) == ["in_proj_weight"]
    torch.testing.assert_close(attn(x, x, x)[0], before, atol=1e-6, rtol=1e-5)
    (t,) = gated_tensors(attn)
    with torch.no_grad():
        t.gates[1][2] = 0
    w, b = attn.in_proj_weight.view(3, 4, 2, 8), attn.in_proj_bias.view(3, 4, 2)
    assert bool((w[:, 2] == 0).all()) and bool((b[:, 2] == 0).all()) and bool((w[:, 1] != 0).any())


def test_structure_is_validated_and_mixes_with_elements():
    with pytest.raises(ValueError, match="structure"):
        FactorizeConfig(structure="rows")
    with pytest.raises(ValueError, match="num_heads"):
        factorize_(nn.Linear(4, 6), 3, FactorizeConfig(structure="heads"))
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    names = factorize_(net, 3, FactorizeConfig(structure={"0": "outputs"}))
    assert names == ["0.weight", "2.weight"] and [t.name for t in gated_tensors(net)] == ["0.weight"]
    assert factorize_(net, 3, FactorizeConfig(structure={"0": "outputs"})) == names  # idempotent
    with pytest.raises(ValueError, match="another parametrization"):
        factorize_(net, 2, FactorizeConfig(structure="outputs", include=["0"]))


class _OwnForwardLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flip(-1))


@pytest.mark.parametrize(("layer", "structure", "shape", "on_weight"), [
    (lambda: nn.Linear(12, 8), "outputs", (5, 12), False),
    (lambda: nn.Linear(12, 8, bias=False), "outputs", (5, 12), False),
    (lambda: nn.Linear(12, 8), "heads", (2, 3, 12), False),
    (lambda: nn.Linear(12, 8), "outputs", (3, 4, 12), True),  # 12 rows, 12 inputs: the weight is not larger
    (lambda: nn.Conv1d(8, 6, 3), "outputs", (1, 8, 5), False),
    (lambda: nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect"), "outputs", (2, 8, 3, 3), False),
    (lambda: nn.Conv2d(8, 6, 3), "outputs", (8, 4, 4), False),  # unbatched
    (lambda: nn.Conv2d(3, 6, 3), "outputs", (2, 3, 7, 7), True),  # 98 positions, 27 inputs per filter
])
def test_gates_on_the_output_give_the_weight_gated_function_and_gradients(layer, structure, shape, on_weight):
    """Linear and Conv layers gated by outputs or heads scale their output by the gates instead of their weight where
    the output is the smaller side (fewer input rows than inputs per output): the output and every factor's gradient
    equal the parametrized weight's (the layer's own forward) to float tolerance."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    net = nn.Sequential(layer())
    factorize_(net, depth=3, config=FactorizeConfig(structure=structure, num_heads=2 if structure == "heads" else None))
    (tensor,) = gated_tensors(net)
    with torch.no_grad():
        tensor.gates[0].uniform_(-1.5, 1.5)
        tensor.gates[0][1] = 0.0  # a dropped group
    assert type(net[0]).forward.__name__ == "_output_gated_forward"
    calls = []
    net[0].parametrizations.weight[0].register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(*shape)
    net[0](x)
    assert len(calls) == int(on_weight)  # the gated product of the weight is computed only on the weight's side
    own = parametrize.type_before_parametrizations(net[0]).forward  # through the parametrized weight
    results = []
    for forward in (net[0], lambda inp: own(net[0], inp)):
        net.zero_grad()
        out = forward(x)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in tensor.factors]))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_gates_stay_on_the_weight_where_the_output_cannot_carry_them():
    """Gates by inputs, a subclass with its own forward, and a weight with a further parametrization keep the weight
    gated; collapsing restores the layer's own forward."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return 2 * w

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), _OwnForwardLinear(5, 4), nn.Linear(4, 3))
    factorize_(net, depth=2, config=FactorizeConfig(structure={"0": "inputs", "1": "outputs", "2": "outputs"}))
    assert type(net[0]).forward is nn.Linear.forward and type(net[1]).forward is _OwnForwardLinear.forward
    assert type(net[2]).forward.__name__ == "_output_gated_forward"
    x = torch.randn(7, 6)
    before = net(x)
    doubled = copy.deepcopy(net)
    parametrize.register_parametrization(doubled[2], "weight", Twice())
    hidden = doubled[1](doubled[0](x))
    torch.testing.assert_close(doubled[2](hidden), torch.nn.functional.linear(hidden, doubled[2].weight,
                                                                               doubled[2].bias))
    torch.testing.assert_close(doubled[2].weight, 2 * net[2].weight)
    collapse_(net)
    assert all(type(m).forward in (nn.Linear.forward, _OwnForwardLinear.forward) for m in net)
    torch.testing.assert_close(net(x), before)


@pytest.mark.parametrize("structure", ["outputs", "heads"])
def test_zeroing_groups_keeps_the_remembered_magnitudes_exact(structure):
    """After ``zero_units_`` the remembered group sums and RMS equal a recomputation bit for bit (the dropped groups
    exact zeros, the rest unchanged), so the controller after a cut reads them without a pass over the weights."""
    from lightning_dwf.core import gating

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    factorize_(net, depth=3, config=FactorizeConfig(structure=structure, num_heads=4 if structure == "heads" else None,
                                                    include=["0"]))
    (tensor,) = gated_tensors(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 10)).sum().backward()
    opt.step()
    before = tensor.unit_magnitudes().clone()
    drop = torch.zeros(tensor.groups, dtype=torch.bool)
    drop[1] = True
    tensor.zero_units_(drop, [opt.state])
    assert gating._MAGNITUDES[id(tensor.omega)][0] == tensor._versions()  # still remembered after the writes
    remembered = tensor._group_sums()
    gating._MAGNITUDES.pop(id(tensor.omega))
    fresh = tensor._group_sums()
    for a, b in zip(remembered, fresh, strict=True):
        assert torch.equal(a, b)
    assert fresh[1][1] == 0 and torch.equal(fresh[1][~drop], before[~drop])


@pytest.mark.parametrize("factorized", [False, True])
def test_following_batch_norm_skips_the_layers_own_parametrizations(factorized):
    """A Conv's BatchNorm is found whether or not the Conv is parametrized (its factors are not "after" it), and a
    layer followed by anything else has none."""
    from lightning_dwf import factorize_
    from lightning_dwf.core.gate_targets import following_batch_norm

    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3), nn.ReLU())
    if factorized:
        factorize_(net, depth=3)
    found = following_batch_norm(net, "0")
    assert found is not None and found[0] == "1" and found[1] is net[1]
    assert following_batch_norm(net, "4") is None
