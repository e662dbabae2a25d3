"""``FactorPenalty`` (``lightning_dwf.training.penalty``) in plain PyTorch loops: the same steps as weight decay 2λ/D
and as the explicit loss term, the user's own weight decay neutralized on the factors, binding errors, the factor LR
multiplier, the penalty kind of each optimizer family, and the proximal step under Adam."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DEPTHS
from torch import nn

from lightning_dwf import (
    FactorizeConfig,
    FactorPenalty,
    collapse_,
    factor_parameters,
    factorize_,
    factorized_tensors,
    fix_support_,
    penalty_kind,
)
from lightning_dwf.core import functional
from lightning_dwf.core.functional import factor_penalty


def _tiny(depth, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    factorize_(model, depth)
    return model


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_penalty_gradient_equals_sgd_weight_decay(depth, momentum):
    """FactorPenalty gives the same SGD steps as weight_decay=2λ/D on the factors and as the explicit loss term."""
    lam, lr, x = 0.05, 0.1, torch.randn(8, 6)
    models = [_tiny(depth) for _ in range(3)]
    a, b, c = models
    opt_a = torch.optim.SGD(a.parameters(), lr=lr, momentum=momentum)
    penalty = FactorPenalty(factor_parameters(a), lam, depth)
    penalty.bind([opt_a])
    opt_b = torch.optim.SGD(
        [
            {"params": factor_parameters(b), "weight_decay": 2 * lam / depth},
            {"params": [p for n, p in b.named_parameters() if "original" not in n]},
        ],
        lr=lr,
        momentum=momentum,
    )
    opt_c = torch.optim.SGD(c.parameters(), lr=lr, momentum=momentum)
    for _ in range(3):
        for model, opt in zip(models, (opt_a, opt_b, opt_c)):
            opt.zero_grad()
            loss = model(x).pow(2).mean()
            if model is c:
                loss = loss + sum(factor_penalty(t.factors, lam) for t in factorized_tensors(c))
            loss.backward()
            if model is a:
                penalty.before_step(opt)
            opt.step()
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        torch.testing.assert_close(pa, pb)
        torch.testing.assert_close(pa, pc)


def test_user_weight_decay_is_neutralized_on_factors():
    """Coupled (SGD) and decoupled (AdamW) user decay on a mixed group: factors get exactly λ, other params keep
    theirs."""
    lam, depth, x = 0.02, 3, torch.randn(8, 6)
    # Without the neutralization, AdamW's decay would move the factors by ~4e-3 here.
    for user_opt, ref_opt, tol in [
        (
            lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.3),
            lambda f, o: torch.optim.SGD(
                [{"params": f, "weight_decay": 2 * lam / depth}, {"params": o, "weight_decay": 0.3}], lr=0.1
            ),
            1e-6,
        ),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1), lambda f, o: None, 1e-5),
    ]:
        a, b = _tiny(depth), _tiny(depth)
        opt_a = user_opt(list(a.parameters()))
        pen = FactorPenalty(factor_parameters(a), lam, depth)
        pen.bind([opt_a])
        assert pen.user_weight_decay()
        others_b = [p for n, p in b.named_parameters() if "original" not in n]
        opt_b = ref_opt(factor_parameters(b), others_b)
        if opt_b is None:  # AdamW: factors get the decoupled penalty (AdamW decay 2λ/D), others the user's decay
            opt_b = torch.optim.AdamW(factor_parameters(b), lr=0.01, weight_decay=2 * lam / depth)
            opt_b2 = torch.optim.AdamW(others_b, lr=0.01, weight_decay=0.1)
        else:
            opt_b2 = None
        for _ in range(3):
            for model, opts in ((a, [opt_a]), (b, [o for o in (opt_b, opt_b2) if o])):
                for o in opts:
                    o.zero_grad()
                model(x).pow(2).mean().backward()
                if model is a:
                    pen.before_step(opt_a)
                for o in opts:
                    o.step()
        for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
            torch.testing.assert_close(pa, pb, rtol=tol, atol=tol, msg=name)


_USER_OPTIMIZERS = {  # (the user's optimizer on every parameter, the reference on the factors: penalty kind)
    "sgd": (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=0.3),
            lambda ps, lr, wd: torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=wd)),
    "adam": (lambda ps, lr: torch.optim.Adam(ps, lr=lr, weight_decay=0.3),
             lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)),
    "adamw": (lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.3),
              lambda ps, lr, wd: torch.optim.AdamW(ps, lr=lr, weight_decay=wd)),
}


@pytest.mark.parametrize("order", ["plain", "closure"])
@pytest.mark.parametrize("optimizer", sorted(_USER_OPTIMIZERS))
@pytest.mark.parametrize("multiplier", [1.0, 5.0])
@pytest.mark.parametrize("lam", [0.0, 0.02])
def test_factors_step_at_the_multiplied_lr_with_the_users_decay_neutralized(order, optimizer, multiplier, lam):
    """With a factor LR multiplier ``m`` and the user's weight decay on a mixed group, the factors step as the same
    optimizer family at ``m × lr`` with the DWF penalty only: ``2λ/D`` through the gradient under SGD; under Adam-type
    the decoupled shrink at ``m × lr``, which the multiplier scales with the rest of the step's update (a decay of
    ``m·2λ/D`` at ``m × lr``). The other parameters keep the user's decay at ``lr``. The same whether
    :meth:`FactorPenalty.before_step` runs before ``optimizer.step()`` (a plain loop, 16-bit AMP with a gradient
    scaler) or inside its closure (Lightning's 32-bit and bfloat16 steps, after the step pre-hook)."""
    depth, lr, x = 3, 0.01, torch.randn(8, 6)
    user, reference = _USER_OPTIMIZERS[optimizer]
    a, b = _tiny(depth), _tiny(depth)
    opt_a = user(list(a.parameters()), lr)
    pen = FactorPenalty(factor_parameters(a), lam, depth)
    pen.bind([opt_a])
    for factor in factor_parameters(a):
        pen.multipliers[id(factor)] = multiplier
    others = [p for n, p in b.named_parameters() if "original" not in n]
    decay = 2 * lam / depth * (1.0 if optimizer == "sgd" else multiplier)
    opts_b = [reference(factor_parameters(b), multiplier * lr, decay), user(others, lr)]

    def closure():
        opt_a.zero_grad()
        a(x).pow(2).mean().backward()
        pen.before_step(opt_a)

    for _ in range(4):
        if order == "plain":
            closure()
            opt_a.step()
        else:
            opt_a.step(closure)
        for o in opts_b:
            o.zero_grad()
        b(x).pow(2).mean().backward()
        for o in opts_b:
            o.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_step_the_scaler_skipped_leaves_the_factors_alone(optimizer):
    """16-bit AMP's gradient scaler skips ``optimizer.step`` after a non-finite gradient, though ``before_step`` ran:
    the skipped step changes no factor (the decoupled shrink and the neutralized decay wait for the step's pre-hook,
    until 2026-12-07 they stayed behind), and the next step's update starts from the factors as they are then."""
    depth, lr, m, lam, x = 3, 0.01, 5.0, 0.02, torch.randn(8, 6)
    a, b = _tiny(depth), _tiny(depth)
    pens = []
    for model in (a, b):
        opt = (torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1) if optimizer == "adamw"
               else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
        pen = FactorPenalty(factor_parameters(model), lam, depth)
        pen.bind([opt])
        for factor in factor_parameters(model):
            pen.multipliers[id(factor)] = m
        pens.append((model, opt, pen))
    (_, opt_a, pen_a), _ = pens
    before = [f.detach().clone() for f in factor_parameters(a)]
    opt_a.zero_grad()
    a(x).pow(2).mean().backward()
    pen_a.before_step(opt_a)  # the step the scaler skipped: no optimizer.step
    for factor, value in zip(factor_parameters(a), before, strict=True):
        torch.testing.assert_close(factor.detach(), value, rtol=0, atol=0)
    for model, opt, pen in pens:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        pen.before_step(opt)
        opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


def test_penalty_binding_errors():
    model = _tiny(3)

    class Custom(torch.optim.SGD):  # a subclass of SGD is still coupled
        pass

    pen = FactorPenalty(factor_parameters(model), 0.1, 3)
    pen.bind([Custom(model.parameters(), lr=0.1, weight_decay=0.1)])

    class Unknown(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1, "weight_decay": 0.1})

    with pytest.raises(ValueError, match="cannot tell whether it is coupled or decoupled"):
        pen.bind([Unknown(model.parameters())])
    with pytest.raises(ValueError, match="in no optimizer"):
        pen.bind([torch.optim.SGD([p for n, p in model.named_parameters() if "original" not in n], lr=0.1)])
    with pytest.raises(ValueError, match="in two optimizers"):
        pen.bind([torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)])


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_lr_multiplier_equals_scaled_lr(optimizer):
    depth, mult, x = 3, 3.0, torch.randn(8, 6)
    a, b = _tiny(depth), _tiny(depth)
    make = (
        (lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9))
        if optimizer == "sgd"
        else (lambda ps, lr: torch.optim.Adam(ps, lr=lr))
    )
    opt_a = make(a.parameters(), 0.01)
    pen = FactorPenalty(factor_parameters(a), 0.01, depth, lr_multiplier=mult)
    pen.bind([opt_a])
    # SGD: the penalty is coupled L2 through the gradient; Adam: decoupled, i.e. AdamW decay 2λ/D on the factors, a
    # shrink the multiplier scales with the rest of the update (decay mult·2λ/D at mult × lr)
    decay = 2 * 0.01 / depth * (1.0 if optimizer == "sgd" else mult)
    groups = [
        {"params": factor_parameters(b), "lr": 0.01 * mult, "weight_decay": decay},
        {"params": [p for n, p in b.named_parameters() if "original" not in n], "weight_decay": 0.0},
    ]
    opt_b = make(groups, 0.01) if optimizer == "sgd" else torch.optim.AdamW(groups, lr=0.01)
    for _ in range(3):
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            if model is a:
                pen.before_step(opt)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)
    pen.unbind()


def test_lr_multiplier_follows_a_dtype_change_between_steps():
    """The step's snapshot buffer is kept from step to step; a model cast to float64 mid-run gets a new one (a stale
    float32 buffer would round the snapshot, or fail the lerp)."""
    depth, mult, x = 3, 3.0, torch.randn(8, 6, dtype=torch.float64)
    a, b = _tiny(depth), _tiny(depth)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.01)
    pen = FactorPenalty(factor_parameters(a), 0.0, depth, lr_multiplier=mult)
    pen.bind([opt_a])
    opt_b = torch.optim.SGD([{"params": factor_parameters(b), "lr": 0.01 * mult},
                             {"params": [p for n, p in b.named_parameters() if "original" not in n]}], lr=0.01)
    for step in range(3):
        if step == 1:
            a.double(), b.double()
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x.to(next(model.parameters()).dtype)).pow(2).mean().backward()
            if model is a:
                pen.before_step(opt)
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert pa.dtype == torch.float64
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7)  # the float32 first step's rounding
    pen.unbind()


def test_penalty_kind_by_optimizer_family():
    ps = [torch.nn.Parameter(torch.ones(2))]
    assert penalty_kind(torch.optim.SGD(ps, lr=0.1)) == "gradient"
    for opt in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam):
        assert penalty_kind(opt(ps, lr=0.1)) == "decoupled", opt


def test_proximal_step_without_lightning():
    """The same proximal step in a plain torch loop (``FactorPenalty.proximal_thresholds`` + ``fix_support_``): with
    Adam, λ = 1 zeroes every weight of the 17 inputs the target ignores and keeps the 3 it uses; λ = 0 zeroes none."""
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 1))
        factorize_(net, depth=3)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        penalty = FactorPenalty(factor_parameters(net), lam=lam, depth=3)
        penalty.bind([opt])
        x = torch.randn(512, 20)
        y = x[:, :3].sum(1, keepdim=True)
        for _ in range(300):
            loss = F.mse_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            penalty.before_step(opt)
            thresholds = penalty.proximal_thresholds(net)
            opt.step()
            fix_support_(net, thresholds, [opt])
        assert bool(thresholds) == (lam > 0)
        collapse_(net)
        first = net[0].weight
        if lam == 0:
            assert bool((first != 0).all())
        else:  # measured: 100 % of the ignored inputs' weights are zero, 90 % of the used ones, loss 0.010
            assert bool((first[:, 3:] == 0).all()) and bool((first[:, :3] != 0).any(dim=0).all())
            assert float(loss) < 0.05


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_factor_step_gain_is_the_sum_over_factors_of_the_others_squared(depth):
    """``factor_step_gain`` equals ``Σ_d Π_{j≠d} ω_j²`` written out, and ``D·|w|^(2−2/D)`` at balance."""
    torch.manual_seed(depth)
    factors = [torch.randn(4, 3) for _ in range(depth)]
    expected = sum(torch.stack([f.square() for j, f in enumerate(factors) if j != d]).prod(0) for d in range(depth))
    torch.testing.assert_close(functional.factor_step_gain(factors), expected)
    workspace = [torch.empty(4, 3) for _ in range(depth)]
    assert torch.equal(functional.factor_step_gain(factors, workspace), functional.factor_step_gain(factors))
    w = torch.rand(5) + 0.1
    balanced = functional.balanced_factors(w, depth)
    torch.testing.assert_close(functional.factor_step_gain(balanced), depth * w.abs() ** (2 - 2 / depth))


def _one_weight_step(depth, magnitude, cap, multiplier, opt_cls=torch.optim.SGD):
    """One optimizer step of ``loss = g·w`` on a single factorized Linear whose weights are ``magnitude`` (balanced
    factors, one weight at 0.01); returns the weight change and the dense step ``lr·g``."""
    layer = nn.Sequential(nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        layer[0].weight.copy_(torch.tensor([[magnitude, 0.01]]))
    factorize_(layer, depth, FactorizeConfig(init="balanced"))
    (tensor,) = factorized_tensors(layer)
    opt = opt_cls(factor_parameters(layer), lr=1e-3)
    pen = FactorPenalty(factor_parameters(layer), 0.0, depth)
    pen.bind([opt])
    pen.multipliers.update({id(f): multiplier for f in tensor.factors})
    pen.cap_steps([tensor.factors], cap)
    before = tensor.product().detach().clone()
    (layer(torch.ones(1, 2)).sum() * 0.5).backward()  # g = 0.5 for both weights
    pen.before_step(opt)
    opt.step()
    pen.unbind()
    return (tensor.product().detach() - before).flatten(), 1e-3 * 0.5


@pytest.mark.parametrize("depth", [2, 3])
def test_step_cap_holds_a_large_weight_to_cap_times_the_dense_step_and_leaves_small_ones(depth):
    """Under SGD a weight of 50 would move ``D·50^(2−2/D)·m`` times as far as a dense one (thousands); capped it
    moves ``cap`` times as far (to first order), and the small weight moves as without the cap."""
    free, dense = _one_weight_step(depth, 50.0, None, 4.0)
    capped, _ = _one_weight_step(depth, 50.0, 3.0, 4.0)
    assert abs(free[0]) > 100 * dense
    assert abs(capped[0]) == pytest.approx(3.0 * dense, rel=0.02)
    assert capped[1] == free[1]  # far below the cap: the same bits


def test_step_cap_leaves_adam_steps_alone():
    """Adam-type steps are normalized: the cap changes nothing there."""
    free, _ = _one_weight_step(3, 50.0, None, 4.0, torch.optim.Adam)
    capped, _ = _one_weight_step(3, 50.0, 3.0, 4.0, torch.optim.Adam)
    assert torch.equal(free, capped)


def test_step_cap_scales_with_the_rollback_step_scale():
    """A rollback halves the factors' step (``lr_multiplier``); the cap halves with it."""
    layer = nn.Sequential(nn.Linear(1, 1, bias=False))
    with torch.no_grad():
        layer[0].weight.fill_(50.0)
    factorize_(layer, 3, FactorizeConfig(init="balanced"))
    (tensor,) = factorized_tensors(layer)
    opt = torch.optim.SGD(factor_parameters(layer), lr=1e-3)
    pen = FactorPenalty(factor_parameters(layer), 0.0, 3, lr_multiplier=0.5)
    pen.bind([opt])
    pen.cap_steps([tensor.factors], 3.0)
    layer(torch.ones(1, 1)).sum().backward()
    opt.step()
    assert float(50.0 - tensor.product().detach()) == pytest.approx(0.5 * 3.0 * 1e-3, rel=0.02)
    pen.unbind()
