"""The penalty reaches every optimizer step of a fit exactly once: under gradient accumulation, whatever
``configure_optimizers`` returns (its scheduler driving the factors' LR), with manual optimization and two optimizers,
inside gradient clipping, and in PyTorch's fused optimizer kernels."""

from __future__ import annotations

import pytest
import torch
from conftest import NO_FUSED_CPU, PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, fused_on_cpu, trainer_kwargs
from lightning.pytorch import Trainer

from lightning_dwf import CollapseConfig, DWFCallback, FixedLamConfig, factor_parameters


def test_penalty_applied_once_per_optimizer_step(tmp_path):
    """With a zero data loss, every factor shrinks by exactly (1 - lr·2λ/D) per optimizer step (accumulation
    included)."""
    lam, lr, depth = 0.5, 0.2, 3
    model = ToyModel(lr=lr, zero_loss=True, n=64, batch_size=16)
    dwf = DWFCallback(
        depth=depth, regime=FixedLamConfig(lam, recovery=0),
        factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    snap = FactorSnapshot()
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=1, callbacks=[dwf, snap], accumulate_grad_batches=2, enable_checkpointing=False
        )
    )
    trainer.fit(model)
    assert trainer.global_step == 2
    shrink = (1 - lr * 2 * lam / depth) ** trainer.global_step
    assert len(factor_parameters(model)) == len(snap.factors) == 2 * depth
    for end, start in zip(factor_parameters(model), snap.factors):
        torch.testing.assert_close(end, start * shrink)


@pytest.mark.parametrize("form", ["optimizer", "list", "tuple_of_lists", "dict", "dict_list"])
def test_every_configure_optimizers_form_gets_the_penalty(tmp_path, form):
    """Whatever configure_optimizers returns, factors get the penalty once per step and the scheduler drives their
    LR."""

    class Model(ToyModel):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.2)
            sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
            return {
                "optimizer": opt,
                "list": [opt],
                "tuple_of_lists": ([opt], [sched]),
                "dict": {"optimizer": opt, "lr_scheduler": sched},
                "dict_list": [{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}],
            }[form]

    model = Model(zero_loss=True, n=32, batch_size=16)
    snap = FactorSnapshot()
    dwf = DWFCallback(
        depth=3, regime=FixedLamConfig(0.5, recovery=0),
        factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[dwf, snap], enable_checkpointing=False))
    trainer.fit(model)
    scheduled = form not in ("optimizer", "list")
    shrink = 1.0
    for lr in [0.2, 0.2] + ([0.1, 0.1] if scheduled else [0.2, 0.2]):
        shrink *= 1 - lr * 2 * 0.5 / 3
    assert len(factor_parameters(model)) == len(snap.factors) == 6
    for end, start in zip(factor_parameters(model), snap.factors):
        torch.testing.assert_close(end, start * shrink)


class ManualModel(ToyModel):
    """Manual optimization with two optimizers: one for the first layer, one for the rest."""

    def __init__(self, **kwargs):
        super().__init__(zero_loss=True, **kwargs)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y) * 0.0
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(loss)
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        first = list(self.net[0].parameters())
        rest = [p for p in self.parameters() if all(p is not q for q in first)]
        return torch.optim.SGD(first, lr=0.1), torch.optim.SGD(rest, lr=0.2)


def test_manual_optimization_with_two_optimizers(tmp_path):
    lam, depth = 0.5, 3
    model = ManualModel(n=32, batch_size=16)
    snap = FactorSnapshot()
    dwf = DWFCallback(
        depth=depth, regime=FixedLamConfig(lam, recovery=0),
        factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, snap], enable_checkpointing=False)).fit(model)
    first = {id(p) for p in model.net[0].parameters()}
    assert len(factor_parameters(model)) == len(snap.factors) == 2 * depth
    for end, start in zip(factor_parameters(model), snap.factors):
        lr = 0.1 if id(end) in first else 0.2
        torch.testing.assert_close(end, start * (1 - lr * 2 * lam / depth) ** 2)


def test_gradient_clipping_includes_the_penalty(tmp_path):
    lam, depth, lr, clip = 0.5, 3, 0.2, 1e-3
    model = ToyModel(lr=lr, zero_loss=True, n=16, batch_size=16)
    snap = FactorSnapshot()
    dwf = DWFCallback(
        depth=depth, regime=FixedLamConfig(lam, recovery=0),
        factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    Trainer(
        **trainer_kwargs(
            tmp_path, max_epochs=1, gradient_clip_val=clip, callbacks=[dwf, snap], enable_checkpointing=False
        )
    ).fit(model)
    coef = 2 * lam / depth
    norm = coef * torch.sqrt(sum(f.pow(2).sum() for f in snap.factors))
    scale = clip / (float(norm) + 1e-6)
    assert len(factor_parameters(model)) == len(snap.factors) == 2 * depth
    for end, start in zip(factor_parameters(model), snap.factors):
        torch.testing.assert_close(end, start - lr * coef * start * scale)


class FusedModel(ToyModel):
    """SGD with momentum and weight decay, or AdamW, built with ``fused=True`` or the default loop."""

    def __init__(self, optimizer: str, fused: bool) -> None:
        super().__init__()
        self.optimizer_name, self.fused = optimizer, fused

    def configure_optimizers(self):
        fused = {"fused": True} if self.fused else {}
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, **fused)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01, **fused)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_fused_optimizers_train_like_their_loop(tmp_path, optimizer):
    """``fused=True`` (the cheaper kernel on CPU under Adam-type optimizers, docs/findings/cost.md) gets the same
    penalty, step cap and cut as the default loop: the same zeros and the same weights up to rounding."""
    if not fused_on_cpu(torch.optim.SGD if optimizer == "sgd" else torch.optim.AdamW):
        pytest.skip(NO_FUSED_CPU)
    weights = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = FusedModel(optimizer, fused)
        dwf = DWFCallback(depth=3, target_sparsity=0.8, collapse=CollapseConfig(save=False))
        Trainer(**trainer_kwargs(tmp_path / str(fused), max_epochs=20, callbacks=[dwf],
                                 enable_checkpointing=False)).fit(model)
        weights[fused] = [p.detach().clone() for p in model.parameters()]
    for loop, kernel in zip(weights[False], weights[True]):
        assert torch.equal(loop == 0, kernel == 0)
        torch.testing.assert_close(kernel, loop, atol=1e-3, rtol=1e-3)
    zeros = sum(int((w == 0).sum()) for w in weights[True] if w.dim() > 1)
    assert zeros == pytest.approx(0.8 * sum(w.numel() for w in weights[True] if w.dim() > 1), abs=1)
