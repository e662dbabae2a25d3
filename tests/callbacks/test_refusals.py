"""Set-ups DWF cannot train correctly are refused early, with the fix: nothing to factorize, an already factorized
model, sharded strategies, true half precision (and why: the penalty step is lost), fused optimizers under a grad
scaler, and callbacks that change the weights behind DWF's back. The fused-optimizer and sharded-strategy tests pin the
behaviour: they compare exact values (or float32-exact ones) so that a change of behaviour, not only a crash, fails."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelPruning, StochasticWeightAveraging
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dwf import DWFCallback, FactorizeConfig, factorize_, factorized_tensors


def test_bad_setups_raise_in_setup(tmp_path):
    with pytest.raises(ValueError, match="Nothing to factorize"):
        Trainer(
            **trainer_kwargs(
                tmp_path, callbacks=[DWFCallback(depth=3, lam=0.1, factorize=FactorizeConfig(layer_types=["Conv2d"]))]
            )
        ).fit(ToyModel())
    with pytest.raises(ValueError, match="matches no"):
        Trainer(
            **trainer_kwargs(
                tmp_path, callbacks=[DWFCallback(depth=3, lam=0.1, factorize=FactorizeConfig(include=["encoder.*"]))]
            )
        ).fit(ToyModel())
    model = ToyModel()
    factorize_(model, 2)
    with pytest.raises(ValueError, match="already factorized with depth 2"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=0.1)])).fit(model)
    dwf = DWFCallback(depth=3, lam=0.1)
    trainer = Trainer(**trainer_kwargs(tmp_path))
    trainer.strategy.__class__ = type("FakeFSDP", (FSDPStrategy,), {})  # an FSDP strategy without needing CUDA
    with pytest.raises(MisconfigurationException, match="does not support"):
        dwf.setup(trainer, ToyModel(), "fit")


@pytest.mark.parametrize(("strategy_cls", "why"), [(FSDPStrategy, "flattened concatenation"),
                                                   (DeepSpeedStrategy, "steps the optimizer itself")])
def test_fsdp1_and_deepspeed_are_refused_in_setup(strategy_cls, why):
    """FSDP1 and DeepSpeed are refused with the reason and the supported alternative (FSDP2 through
    ModelParallelStrategy, tested in test_sharded.py)."""
    strategy = strategy_cls.__new__(strategy_cls)  # no CUDA, no deepspeed needed: setup only looks at the type
    dwf = DWFCallback(depth=3, lam=0.1)
    model = ToyModel()
    with pytest.raises(
        MisconfigurationException,
        match=rf"does not support {strategy_cls.__name__}: .*{why}.* Use strategy=ModelParallelStrategy\(.*fully_shard",
    ):
        dwf.setup(SimpleNamespace(strategy=strategy), model, "fit")
    assert not factorized_tensors(model)
    dwf.setup(SimpleNamespace(strategy=strategy), model, "validate")  # other stages return before the check


@pytest.mark.parametrize("precision", ["16-true", "bf16-true"])
def test_true_half_precision_is_refused(tmp_path, precision):
    with pytest.raises(MisconfigurationException, match="rounds to exactly 1"):
        Trainer(
            **trainer_kwargs(
                tmp_path,
                max_epochs=1,
                precision=precision,
                callbacks=[DWFCallback(depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR)],
            )
        ).fit(ToyModel())


def test_half_precision_really_loses_the_penalty():
    """The reason for the refusal: one penalty step at lr·2λ/D = 1e-4 leaves a bfloat16 factor unchanged."""
    factor = torch.tensor([0.37], dtype=torch.bfloat16)
    assert torch.equal(factor * (1 - 1e-4), factor)
    assert not torch.equal(factor.float() * (1 - 1e-4), factor.float())


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, fused=True),
        lambda ps: torch.optim.Adam(ps, lr=0.1, fused=True),
    ],
    ids=["sgd", "adam"],
)
def test_fused_optimizer_under_a_grad_scaler_is_refused(make):
    """16-mixed on CPU becomes bf16-mixed in Lightning (no scaler), so the check is driven with a stub trainer."""
    model = ToyModel()
    factorize_(model, 3)
    opt = make(model.parameters())
    assert opt._step_supports_amp_scaling
    dwf = DWFCallback(depth=3, lam=0.01)
    budget = dict(estimated_stepping_batches=10, global_step=0)
    stub = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")), optimizers=[opt],
                           **budget)
    with pytest.raises(
        MisconfigurationException, match=rf"{type(opt).__name__} unscales gradients inside step\(\).*fused=False"
    ):
        dwf.on_fit_start(stub, model)
    # no scaler (fp32, bf16-mixed): fused optimizers are fine; an unfused one is fine with a scaler
    dwf.on_fit_start(SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None), optimizers=[opt], **budget), model)
    assert dwf.penalty is not None
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    dwf.on_fit_start(
        SimpleNamespace(precision_plugin=SimpleNamespace(scaler=torch.amp.GradScaler("cpu")), optimizers=[plain],
                        **budget), model
    )


@pytest.mark.parametrize(
    "other",
    [
        lambda: ModelPruning("l1_unstructured", amount=0.5),
        lambda: StochasticWeightAveraging(swa_lrs=0.01),
        lambda: EMAWeightAveraging(),
    ],
    ids=["ModelPruning", "SWA", "EMA"],
)
def test_incompatible_callbacks_are_refused(tmp_path, other):
    with pytest.raises(MisconfigurationException, match="cannot be combined with"):
        Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=0.01), other()])).fit(ToyModel())
