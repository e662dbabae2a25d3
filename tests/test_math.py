"""The mathematics of DWF: AM–GM penalty identity, gradients, init, collapse and the LR floor."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lightning_dwf import (
    FactorizeConfig,
    FactorPenalty,
    collapse_,
    collapse_state_dict,
    dwf_init_,
    factor_parameters,
    factorize_,
    factorized_tensors,
    sparsity_report,
)
from lightning_dwf.core.functional import (
    balanced_factors,
    factor_penalty,
    hadamard_product,
    l2d_quasinorm,
    lam_to_weight_decay,
    lr_floor,
    misalignment,
    prox_threshold,
    weight_decay_to_lam,
)

DEPTHS = [2, 3, 4]


@pytest.mark.parametrize("depth", DEPTHS)
def test_am_gm_identity(depth):
    """(λ/D)Σ||ω_d||² ≥ λΣ|w|^(2/D), with equality exactly for the balanced factorization."""
    factors = [torch.randn(50) for _ in range(depth)]
    w = hadamard_product(factors)
    lam = 0.3
    assert factor_penalty(factors, lam) >= lam * l2d_quasinorm(w, depth) - 1e-6
    assert misalignment(factors) >= -1e-6
    balanced = balanced_factors(w, depth)
    torch.testing.assert_close(hadamard_product(balanced), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(factor_penalty(balanced, lam), lam * l2d_quasinorm(w, depth), rtol=1e-5, atol=1e-6)
    assert abs(float(misalignment(balanced))) < 1e-4
    if depth == 2:  # Hoff's identity: the lasso
        torch.testing.assert_close(l2d_quasinorm(w, 2), w.abs().sum())


def test_weight_decay_conversion():
    assert lam_to_weight_decay(1e-3, 3) == pytest.approx(2e-3 / 3)
    assert weight_decay_to_lam(lam_to_weight_decay(0.07, 4), 4) == pytest.approx(0.07)


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


@pytest.mark.parametrize("depth", DEPTHS)
def test_dwf_init_bounds_and_variance(depth):
    sigma, eps_ratio = 0.05, 0.25
    factors = [torch.empty(200_000) for _ in range(depth)]
    dwf_init_(factors, sigma, eps_ratio)
    w = hadamard_product(factors)
    assert w.abs().min() > eps_ratio * sigma * (1 - 1e-5)
    assert w.abs().max() < 2 * sigma * (1 + 1e-5)
    high = min(1.0, (2 * sigma) ** (1 / depth))
    for f in factors:
        assert f.abs().max() <= high + 1e-6 and f.abs().min() >= (eps_ratio * sigma) ** (1 / depth) - 1e-6
        assert abs(float((f > 0).float().mean()) - 0.5) < 0.01  # symmetric signs
    ratio = float(w.std()) / sigma  # truncation trades 14-22% of the variance for a light-tailed distribution
    assert 0.7 < ratio < 0.95, ratio
    kurtosis = float((w**4).mean() / (w**2).mean() ** 2)
    assert kurtosis < 2.0  # untruncated variance matching would give 3**depth


def test_untruncated_variance_matching_has_kurtosis_3_to_the_d():
    for depth in (2, 3):
        w = hadamard_product([torch.randn(400_000) for _ in range(depth)])
        assert float((w**4).mean() / (w**2).mean() ** 2) == pytest.approx(3**depth, rel=0.15)


def _models():
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)), torch.randn(4, 10)),
        "conv": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.Conv1d(3, 2, 1) if False else nn.Flatten(),
                nn.Linear(3 * 4 * 4, 2),
            ).eval(),
            torch.randn(2, 2, 6, 6),
        ),
        "conv1d": (
            nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 2)),
            torch.randn(2, 2, 8),
        ),
    }


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d"])
def test_balanced_init_preserves_outputs(depth, kind):
    model, x = _models()[kind]
    expected = model(x)
    names = factorize_(model, depth, config=FactorizeConfig(init="balanced"))
    assert names and all(".weight" in n for n in names)
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    assert sparsity_report(model).relative_misalignment < 1e-5


@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_collapsed_equals_factorized(depth, kind):
    model, x = _models()[kind]
    factorize_(model, depth)
    expected = model(x)
    factorized_sd = copy.deepcopy(model.state_dict())
    copy_ = copy.deepcopy(model)
    collapse_(copy_, threshold=0.0)
    assert not factorized_tensors(copy_)
    torch.testing.assert_close(copy_(x), expected)
    # the original (which shares parametrize's dynamic class with the copy) still works and trains
    torch.testing.assert_close(model(x), expected)
    assert factor_parameters(model)
    # offline conversion gives the same state dict as the in-place collapse
    offline = collapse_state_dict(factorized_sd, threshold=0.0)
    assert offline.keys() == copy_.state_dict().keys()
    for k, v in copy_.state_dict().items():
        torch.testing.assert_close(offline[k], v)
    plain = _models()[kind][0]
    plain.load_state_dict(offline)  # loads into the ordinary class, strict
    torch.testing.assert_close(plain(x), expected)


def test_collapse_threshold_makes_exact_zeros():
    model = nn.Linear(4, 3)
    factorize_(model, 3)
    f0, f1, f2 = factorized_tensors(model)[0].factors
    with torch.no_grad():
        f0[0].fill_(1e-3)  # |w| <= 1e-3 * 1 * 1 -> below threshold 1e-2
        f1[0].fill_(1.0)
        f2[0].fill_(1.0)
    report = sparsity_report(model, threshold=1e-2, lam=0.1)
    assert report.nonzero == 8 and report.numel == 12
    assert report.compression_ratio == pytest.approx(1.5)
    assert report.layers[0].sparsity == pytest.approx(4 / 12)
    assert report.total_params == 15 and report.total_nonzero == 11
    assert report.l2d_penalty == pytest.approx(0.1 * float(l2d_quasinorm(model.weight, 3)), rel=1e-5)
    assert report.factor_penalty == pytest.approx(report.l2d_penalty + 0.1 * report.misalignment, rel=1e-5)
    collapse_(model, threshold=1e-2)
    assert type(model) is nn.Linear
    assert int((model.weight == 0).sum()) == 4
    assert isinstance(model.weight, nn.Parameter) and model.weight.requires_grad


@pytest.mark.parametrize("depth", [2, 3])
def test_lr_floor_predicts_exact_zeros(depth):
    """An unsupported weight under the penalty alone reaches the threshold iff η0 is above the floor (cosine
    schedule)."""
    lam, steps, std, threshold = 0.01, 400, 0.05, 1.19e-7
    floor = lr_floor(lam, steps, std, threshold)

    def final_magnitude(eta0):
        factors = [torch.full((1,), std ** (1 / depth), requires_grad=True) for _ in range(depth)]
        opt = torch.optim.SGD(factors, lr=eta0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        pen = FactorPenalty(factors, lam, depth)
        pen.bind([opt])
        for _ in range(steps):
            opt.zero_grad()
            hadamard_product(factors).sum().mul(0.0).backward()
            pen.before_step(opt)
            opt.step()
            sched.step()
        return float(hadamard_product(factors).abs())

    assert final_magnitude(1.3 * floor) < threshold
    assert final_magnitude(0.7 * floor) > threshold
    assert math.isinf(lr_floor(0.0, steps, std, threshold))


def test_load_dense_and_mismatched_state_dicts():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    model = copy.deepcopy(dense)
    factorize_(model, 3)
    model.load_state_dict(dense.state_dict())  # a dense (or collapsed) checkpoint -> balanced factors
    torch.testing.assert_close(model(x), dense(x), rtol=1e-5, atol=1e-6)
    deeper = copy.deepcopy(dense)
    factorize_(deeper, 4)
    with pytest.raises(ValueError, match="factorized with depth 3"):
        model.load_state_dict(deeper.state_dict())
    with pytest.raises(ValueError, match="already plain"):
        collapse_state_dict(dense.state_dict())


@pytest.mark.parametrize("depth", DEPTHS)
def test_prox_threshold_is_where_the_proximal_map_of_the_l2d_penalty_jumps_to_zero(depth):
    """argmin_x ½(x − z)² + t·|x|^(2/D), by brute force on a fine grid: 0 just below the threshold, not 0 above."""
    step, lam = 0.01, 0.5
    tau = prox_threshold(step, lam, depth)
    x = torch.linspace(0, 1, 1_000_001, dtype=torch.float64)
    for z, zero in ((0.99 * tau, True), (1.01 * tau, False)):
        objective = 0.5 * (x - z) ** 2 + step * lam * x.abs() ** (2.0 / depth)
        assert (float(x[objective.argmin()]) == 0.0) == zero, (depth, z)
    assert prox_threshold(step, 0.0, depth) == 0.0 and prox_threshold(step, lam, 1) == 0.0
