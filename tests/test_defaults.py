"""The defaults as a new user meets them (#14): Adam-type optimizers, small batches, the auto factor LR, rollbacks on
non-finite weights, and global cuts that leave every layer alive."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    DWFDeadLayerWarning,
    DWFRollbackWarning,
    FactorLRConfig,
    FactorPenalty,
    collapse_,
    factor_parameters,
    factorize_,
    factorized_tensors,
    fix_support_,
    keep_masks,
    penalty_kind,
)
from lightning_dwf.core.functional import auto_lr_multiplier


class OptToy(ToyModel):
    """:class:`ToyModel` with a choice of optimizer (``opt``) and a per-step cosine schedule."""

    def __init__(self, opt: str = "adamw", **kwargs) -> None:
        super().__init__(**kwargs)
        self.opt = opt

    def configure_optimizers(self):
        lr = self.hparams.lr
        make = {
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
            "adam": lambda ps: torch.optim.Adam(ps, lr=lr),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=lr),
        }[self.opt]
        opt = make(self.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path, model, dwf, **kwargs):
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[dwf], enable_checkpointing=False, **kwargs))
    trainer.fit(model)
    return trainer


@pytest.mark.parametrize("opt", ["adamw", "adam", "rmsprop"])
@pytest.mark.parametrize("depth", [2, 3])
def test_adam_type_target_mode_reaches_exact_zeros(tmp_path, opt, depth):
    """Defaults only: the target is met exactly, in exact zeros, with no layer emptied, and the net still learns."""
    model = OptToy(opt, lr=3e-3, n=512)
    dwf = DWFCallback(depth=depth, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DWFDeadLayerWarning)
        trainer = _fit(tmp_path, model, dwf, max_epochs=10)
    report = dwf.final_report
    weights = [model.net[0].weight, model.net[2].weight]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == report.numel - report.nonzero
    assert abs(zeros / report.numel - 0.9) <= 1 / report.numel
    assert all(bool(w.any()) for w in weights)
    assert trainer.callback_metrics["val_acc"] > 0.7


@pytest.mark.parametrize("opt", ["adamw", "adam"])
def test_adam_type_fixed_lam_gives_exact_zeros(tmp_path, opt):
    """Fixed λ under Adam-type optimizers: the proximal step of λ·|w|^(2/D) after each optimizer step zeroes weights
    that fall below its threshold; a larger λ gives more zeros, and a useful λ gives many at full accuracy."""
    sparsity = []
    for lam in (0.01, 0.1):
        torch.manual_seed(0)
        model = OptToy(opt, lr=1e-2, n=512)
        dwf = DWFCallback(depth=3, lam=lam, verbose=False, collapse=CollapseConfig(save=False))
        trainer = _fit(tmp_path, model, dwf, max_epochs=20)
        assert float((model.net[0].weight == 0).float().mean()) == pytest.approx(
            1 - dwf.final_report.layers[0].nonzero / dwf.final_report.layers[0].numel
        )
        sparsity.append(dwf.final_report.sparsity)
    # measured on this toy (320 steps, dense 94 %; factor LR ×5, the Adam-type "auto"): λ = 0.01 / 0.03 / 0.05 / 0.1 /
    # 0.2 → 18 / 32 / 57 / 91 / 99 % zeros at 95-98 %. Without the proximal step (0.2) λ = 3 gave 1.4 % zeros and
    # λ = 5 86 % zeros and a dead net: a cliff.
    assert 0 < sparsity[0] < sparsity[1], sparsity
    assert sparsity[1] > 0.5 and trainer.callback_metrics["val_acc"] > 0.9
    assert not dwf.final_report.dead_layers


def test_proximal_step_only_under_fixed_lam_and_decoupled_penalty(tmp_path, monkeypatch):
    """The proximal zeroing runs once per optimizer step in fixed-λ mode under Adam-type optimizers, never under SGD
    (the penalty gradient is the DWF objective there) or in target mode (the cut sets the support)."""
    import lightning_dwf.training.regimes.fixed as callback_module

    calls = []
    real = callback_module.fix_support_
    monkeypatch.setattr(callback_module, "fix_support_", lambda m, t, o=(): calls.append(t) or real(m, t, o))
    cases = [  # (optimizer, mode, epochs, prox expected); 2 batches per epoch, accumulated in pairs: 1 step per epoch
        ("adamw", dict(lam=1.0), 4, True),
        ("sgd", dict(lam=0.02), 4, False),
        ("adamw", dict(target_sparsity=0.9), 60, False),  # target mode plans at least 50 steps
    ]
    for opt, mode, epochs, expected in cases:
        calls.clear()
        model = OptToy(opt, lr=1e-2 if opt == "adamw" else 0.1, n=64)
        dwf = DWFCallback(depth=3, verbose=False, collapse=CollapseConfig(save=False), **mode)
        trainer = _fit(tmp_path, model, dwf, max_epochs=epochs, accumulate_grad_batches=2)
        assert len(calls) == (trainer.global_step if expected else 0), (opt, mode)
        if expected:  # per tensor: the prox threshold at the step's factor lr (AdamW: lr × the multiplier)
            assert set(calls[0]) == {"net.0.weight", "net.2.weight"}
            assert all(t > dwf.collapse.threshold for t in calls[0].values())


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


def test_penalty_kind_by_optimizer_family():
    ps = [torch.nn.Parameter(torch.ones(2))]
    assert penalty_kind(torch.optim.SGD(ps, lr=0.1)) == "gradient"
    for opt in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.NAdam):
        assert penalty_kind(opt(ps, lr=0.1)) == "decoupled", opt


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_batch_32_defaults_do_not_diverge(tmp_path, opt):
    """SGD lr 0.1 momentum 0.9 (the setting whose ×10 recipe diverged at batch 64) and AdamW at batch 32: no NaN, no
    rollback, the target met."""
    model = OptToy(opt, lr=0.1 if opt == "sgd" else 1e-2, n=1024, batch_size=32)
    dwf = DWFCallback(depth=3, target_sparsity=0.95, verbose=False, collapse=CollapseConfig(save=False))
    trainer = _fit(tmp_path, model, dwf, max_epochs=6)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert dwf.rollbacks == 0
    assert abs(dwf.final_report.sparsity - 0.95) <= 1 / dwf.final_report.numel
    assert trainer.callback_metrics["val_acc"] > 0.7


class PoisonOnce(Callback):
    """Throws one factor entry to Inf before the optimizer step ``at``, once (a forced divergence)."""

    def __init__(self, at: int) -> None:
        self.at, self.done = at, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at and not self.done:
            self.done = True
            with torch.no_grad():
                factor_parameters(pl_module)[0].view(-1)[0] = math.inf


@pytest.mark.parametrize("mode", [dict(lam=0.02), dict(target_sparsity=0.9)])
def test_forced_divergence_rolls_back_and_finishes(tmp_path, mode):
    model = ToyModel(lr=0.1, momentum=0.9, scheduler=True, n=512)
    dwf = DWFCallback(depth=3, verbose=False, collapse=CollapseConfig(save=False), **mode)
    poison = PoisonOnce(at=30)
    logged: list[tuple[int, float, float]] = []

    class Log(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            if "dwf/rollbacks" in m:
                logged.append((trainer.global_step, float(m["dwf/rollbacks"]), float(m["dwf/factor_lr_scale"])))

    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, poison, Log()],
                                       enable_checkpointing=False))
    with pytest.warns(DWFRollbackWarning, match=r"NaN/Inf at step 31.*back to the state of step 30"):
        trainer.fit(model)
    assert poison.done and dwf.rollbacks == 1 and dwf.factor_lr_scale == 0.5
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert dwf.final_report is not None and trainer.global_step == 8 * 16
    assert logged[-1][1:] == (1.0, 0.5)
    if "target_sparsity" in mode:
        assert abs(dwf.final_report.sparsity - 0.9) <= 1 / dwf.final_report.numel


class StopAfter(Callback):
    """An interruption: the run plans its epochs but stops after epoch ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module):
        trainer.should_stop = trainer.current_epoch == self.epoch


def test_rollback_scale_and_auto_multipliers_survive_resume(tmp_path):
    """The factor LR multipliers chosen at the start and the rollback state are checkpointed: resuming is exact."""

    def run(extra, ckpt_path=None, root="a"):
        torch.manual_seed(0)
        model = OptToy("sgd", lr=0.1, n=512)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1, save_top_k=-1)
        dwf = DWFCallback(depth=3, target_sparsity=0.9, verbose=False, collapse=CollapseConfig(save=False))
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=8, callbacks=[dwf, ckpt, *extra]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DWFRollbackWarning)
            trainer.fit(model, ckpt_path=ckpt_path)
        return model, dwf

    full, dwf_full = run([PoisonOnce(at=5)], root="full")
    run([PoisonOnce(at=5), StopAfter(3)], root="part")
    resumed, dwf_resumed = run([], ckpt_path=str(tmp_path / "part" / "last.ckpt"), root="part")
    multipliers = dwf_full.factor_lr_multipliers
    assert multipliers == dwf_resumed.factor_lr_multipliers and len(multipliers) == 2
    assert dwf_resumed.factor_lr_scale == dwf_full.factor_lr_scale == 0.5
    assert dwf_resumed.rollbacks == dwf_full.rollbacks == 1
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


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
