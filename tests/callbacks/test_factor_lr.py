"""The factors' learning rate in a fit: the multiplier's warm-up (and its restart when target mode fixes the support),
the ``"auto"`` multipliers per optimizer family, and the check of the factor LR against the floor for exact zeros and
the stability limit."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    DWFLearningRateWarning,
    FactorLRConfig,
    FixedLamConfig,
    ScheduleConfig,
    factor_parameters,
    factorized_tensors,
)
from lightning_dwf.core.functional import auto_lr_multiplier

from .helpers import OptToy, _fit


def test_factor_lr_warmup_ramps_the_multiplier(tmp_path):
    """The multiplier goes linearly from 1 to FactorLRConfig.multiplier over its first `warmup` of the planned steps."""
    seen = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(  # the multiplier used by the step just taken
                (trainer.global_step - 1, dwf.penalty.multiplier_of(factor_parameters(pl_module)[0]))
            )

    dwf = DWFCallback(
        depth=3, lam=1e-3, verbose=False, factor_lr=FactorLRConfig(multiplier=5.0, warmup=0.5, check="off")
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[dwf, Record()], enable_checkpointing=False))
    trainer.fit(ToyModel(n=256, batch_size=32))  # 16 steps, warm-up over 8
    assert [m for _, m in seen] == pytest.approx([1.0 + 4.0 * min(1.0, step / 8) for step, _ in seen])
    assert seen[0][1] == 1.0 and seen[-1][1] == 5.0


def test_factor_lr_warmup_restarts_when_the_support_is_fixed(tmp_path):
    """The cut at the recovery point makes the loss jump: the factor LR multiplier ramps up from 1 again."""

    class Multipliers(Callback):
        def __init__(self, dwf):
            self.dwf, self.seen, self.cut = dwf, {}, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen[trainer.global_step] = self.dwf.penalty.multiplier_of(factor_parameters(pl_module)[0])
            self.cut = self.dwf.regime.controller.recovery_step

    dwf = DWFCallback(
        depth=3,
        target_sparsity=0.9,
        verbose=False,
        schedule=ScheduleConfig(recovery=0.5),
        factor_lr=FactorLRConfig(multiplier=4.0, warmup=0.1),
    )
    record = Multipliers(dwf)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=10, callbacks=[dwf, record], enable_checkpointing=False))
    trainer.fit(ToyModel(lr=0.075, momentum=0.9, scheduler=True, n=512))  # factors: 0.3 after the warm-up
    total, cut, ramp = (
        int(trainer.estimated_stepping_batches),
        record.cut,
        int(0.1 * trainer.estimated_stepping_batches),
    )
    assert cut == int(0.5 * total)
    assert record.seen[0] == 1.0 and record.seen[ramp] == 4.0 and record.seen[cut - 1] == 4.0
    assert record.seen[cut] == 1.0  # first step after the cut
    assert 1.0 < record.seen[cut + ramp // 2] < 4.0 and record.seen[cut + ramp] == 4.0 and record.seen[total - 1] == 4.0


def test_auto_multiplier_by_optimizer_family(tmp_path):
    """``"auto"``: per layer, from its weights' RMS at the start and how the penalty reaches it; a number is used as
    is."""

    class RMS(Callback):
        def on_train_start(self, trainer, pl_module):
            self.rms = {t.name: float(t.product().pow(2).mean().sqrt()) for t in factorized_tensors(pl_module)}

    for opt, kind in (("sgd", "gradient"), ("adamw", "decoupled")):
        model = OptToy(opt, lr=0.1 if opt == "sgd" else 1e-3, n=64)
        dwf = DWFCallback(depth=3, target_sparsity=0.5, verbose=False, collapse=CollapseConfig(on_fit_end=False))
        rms = RMS()
        Trainer(**trainer_kwargs(tmp_path, max_epochs=25, callbacks=[dwf, rms], enable_checkpointing=False)).fit(model)
        assert dwf.factor_lr_multipliers.keys() == rms.rms.keys() == {"net.0.weight", "net.2.weight"}
        for name, value in rms.rms.items():
            assert dwf.factor_lr_multipliers[name] == pytest.approx(auto_lr_multiplier(value, 3, kind), rel=1e-5)
    model = OptToy("sgd", lr=0.1, n=64)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, verbose=False, factor_lr=FactorLRConfig(multiplier=3.0),
                      collapse=CollapseConfig(on_fit_end=False))
    _fit(tmp_path, model, dwf, max_epochs=25)
    assert set(dwf.factor_lr_multipliers.values()) == {3.0}


def test_lr_check_warns_and_errors(tmp_path):
    constant = FixedLamConfig(1e-4, recovery=0)  # the floor is that of a constant λ under SGD
    with pytest.warns(DWFLearningRateWarning, match="below the floor"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, regime=constant)])).fit(
            ToyModel(lr=0.01)
        )
    with pytest.raises(MisconfigurationException, match="below the floor"):
        Trainer(
            **trainer_kwargs(
                tmp_path,
                max_epochs=1,
                callbacks=[DWFCallback(depth=3, regime=constant, factor_lr=FactorLRConfig(check="error"))],
            )
        ).fit(ToyModel(lr=0.01))
    # the default under SGD ramps λ and makes the zeros with the proximal step: no floor to reach
    with warnings.catch_warnings():
        warnings.simplefilter("error", DWFLearningRateWarning)
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=1e-4)])).fit(
            ToyModel(lr=0.01)
        )
    with pytest.raises(MisconfigurationException, match="flips the factors' sign"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=10.0)])).fit(
            ToyModel(lr=0.5)
        )


    class AdamToy(ToyModel):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-3)

    # no floor under Adam-type optimizers (the proximal step makes the zeros there), but the stability limit holds
    with warnings.catch_warnings():
        warnings.simplefilter("error", DWFLearningRateWarning)
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=1e-4)])).fit(AdamToy())
    with pytest.raises(MisconfigurationException, match="flips the factors' sign"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=2e3)])).fit(AdamToy())
    # λ = 100 at lr 1e-3: 2λ/D × (lr × 5) = 0.33, but the multiplier 5 scales that shrink again: 1.67 per step
    with pytest.raises(MisconfigurationException, match=r"× multiplier 5 = 1\.67 >= 1, so the penalty step alone"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=100.0)])).fit(AdamToy())


def test_lr_check_without_a_step_budget(tmp_path):
    """An open-ended run (no max_epochs/max_steps) skips the floor but still refuses an unstable LR."""
    open_ended = dict(max_epochs=-1, max_steps=-1, max_time={"seconds": 1})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=1e-4)], **open_ended)).fit(
            ToyModel(lr=0.01)
        )
    assert not [w for w in caught if "below the floor" in str(w.message)]
    with pytest.raises(MisconfigurationException, match="flips the factors' sign"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=10.0)], **open_ended)).fit(
            ToyModel(lr=0.5)
        )


@pytest.mark.parametrize("pattern_cap", ["default", 2.0, None])
@pytest.mark.parametrize("knob", [dict(target_sparsity=0.9), dict(lam=1e-3)], ids=["target", "ramped-lam"])
def test_pattern_step_cap_holds_until_the_pattern_is_fixed(tmp_path, knob, pattern_cap):
    """``FactorLRConfig(pattern_step_cap=K)`` (default 1): K dense steps while the pattern is made (target mode before
    its recovery point, a ramped fixed λ before its release), ``step_cap`` from the first step after; ``None``:
    ``step_cap`` throughout."""

    class Caps(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[bool, float]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # after DWF's: the cap of this step
            self.seen.append((dwf.regime.pattern_fixed, dwf.penalty.step_cap.cap))

    dwf = DWFCallback(depth=3, verbose=False, collapse=CollapseConfig(save=False),
                      factor_lr=FactorLRConfig(step_cap=3.0, **({} if pattern_cap == "default" else
                                                                  dict(pattern_step_cap=pattern_cap))), **knob)
    caps = Caps()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, caps], enable_checkpointing=False))
    trainer.fit(ToyModel(lr=0.075, momentum=0.9, scheduler=True, n=512))
    phases = [fixed for fixed, _ in caps.seen]
    assert not phases[0] and phases[-1] and phases == sorted(phases)  # made, then fixed for the rest of the run
    made = {"default": 1.0, 2.0: 2.0, None: 3.0}[pattern_cap]
    assert [cap for _, cap in caps.seen] == [3.0 if fixed else made for fixed in phases]


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
@pytest.mark.parametrize("fixed_pattern", ["dense", "factors"])
def test_fixed_pattern_dense_fine_tunes_the_survivors_as_dense_weights(tmp_path, opt, fixed_pattern):
    """``FactorLRConfig(fixed_pattern="dense")``: from the recovery point each tensor is ``ω1 = w`` (unchanged, bit
    for bit) and its 0/1 mask in the other factors, which no longer move; the first step after it is a fresh dense
    optimizer's step on ``ω1`` at the group's LR (no multiplier, no step cap, no factor momentum); the zeros stay
    exact. ``"factors"`` (the default) keeps training every factor."""
    seen: dict[str, object] = {}

    class Watch(Callback):  # after DWF's hooks
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            tensor = factorized_tensors(pl_module)[0]
            if dwf.regime.pattern_fixed and "switch" not in seen:
                seen["switch"] = trainer.global_step
                seen["factors"] = [f.detach().clone() for f in tensor.factors]
                seen["product_before"] = seen["product"]  # after the previous step and the cut

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if seen.get("switch") == trainer.global_step:
                first = factorized_tensors(pl_module)[0].factors[0]
                reference = first.detach().clone().requires_grad_()
                reference.grad = first.grad.clone()
                group = optimizer.param_groups[0]
                make = torch.optim.SGD if opt == "sgd" else torch.optim.AdamW
                # AdamW: DWF has undone the group's decoupled decay in advance (ω1 / (1 − lr·wd)), the step redoes it
                kwargs = dict(momentum=0.9) if opt == "sgd" else dict(weight_decay=group["weight_decay"])
                make([reference], lr=group["lr"], **kwargs).step()
                seen["expected"] = reference.detach()
                seen["trained"] = [f.requires_grad for f in factorized_tensors(pl_module)[0].factors]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            tensor = factorized_tensors(pl_module)[0]
            if seen.get("switch") == trainer.global_step - 1:
                seen["after"] = tensor.factors[0].detach().clone()
            seen["product"] = tensor.product().detach().clone()

    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False),
                      factor_lr=FactorLRConfig(fixed_pattern=fixed_pattern))
    model = ToyModel(lr=0.1, momentum=0.9, scheduler=True, n=512) if opt == "sgd" else OptToy(opt, lr=1e-2, n=512)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, Watch()], enable_checkpointing=False)).fit(model)
    first, *rest = seen["factors"]
    product = seen["product_before"]
    final = model.net[0].weight.detach()  # collapsed at fit end
    weights = torch.cat([model.net[0].weight.detach().flatten(), model.net[2].weight.detach().flatten()])
    assert (weights != 0).float().mean().item() == pytest.approx(0.1, abs=0.005)
    if fixed_pattern == "factors":
        assert not torch.equal(rest[0], (product != 0).to(rest[0].dtype))
        return
    assert torch.equal(first, product)
    assert all(torch.equal(f, (product != 0).to(f.dtype)) for f in rest)
    torch.testing.assert_close(seen["after"], seen["expected"])
    assert seen["trained"] == [True, False, False]  # one process: the mask factors get no gradient
    assert torch.equal(final == 0, product == 0)  # the survivors of the recovery point, no more and no fewer
    assert torch.equal(seen["product"] == 0, product == 0)  # and up to the last step


def test_fixed_pattern_dense_gives_the_factors_back_trainable(tmp_path):
    """A fit that keeps its factors (no collapse) ends with every factor trainable again, the mask factors still 0/1 and
    the model's weights those the dense phase trained (``requires_grad`` is off only while the callback drives it)."""
    dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, factor_lr=FactorLRConfig(fixed_pattern="dense"),
                      collapse=CollapseConfig(on_fit_end=False, save=False))
    model = OptToy("adamw", lr=1e-2, n=512)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf], enable_checkpointing=False)).fit(model)
    for tensor in factorized_tensors(model):
        first, *rest = tensor.factors
        assert all(f.requires_grad for f in tensor.factors)
        assert all(torch.equal(f, (first != 0).to(f.dtype)) for f in rest)
        assert torch.equal(tensor.product(), first)
