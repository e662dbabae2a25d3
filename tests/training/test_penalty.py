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
    FactorPenalty,
    collapse_,
    factor_parameters,
    factorize_,
    factorized_tensors,
    fix_support_,
    penalty_kind,
)
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
    groups = [
        {"params": factor_parameters(b), "lr": 0.01 * mult, "weight_decay": 2 * 0.01 / depth},
        {"params": [p for n, p in b.named_parameters() if "original" not in n], "weight_decay": 0.0},
    ]
    # SGD: the penalty is coupled L2 through the gradient; Adam: decoupled, i.e. AdamW decay 2λ/D on the factors
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
