"""DWFCallback end to end on tiny Linear and Conv+BatchNorm models (Lightning's test style)."""

from __future__ import annotations

import csv
import glob
import json
import os
import warnings

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, toy_data, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    DWFDeadLayerWarning,
    DWFLearningRateWarning,
    FactorizeConfig,
    FactorLRConfig,
    ScheduleConfig,
    factor_parameters,
    factorize_,
    factorized_tensors,
)


class OutputsBeforeCollapse(Callback):
    """Records the (factorized) model's outputs on fixed inputs at train end, before DWF collapses it."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x
        self.outputs: torch.Tensor | None = None

    def on_train_end(self, trainer, pl_module):
        assert factorized_tensors(pl_module)
        pl_module.eval()
        with torch.no_grad():
            self.outputs = pl_module(self.x).clone()
        pl_module.train()


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_fit_logs_metrics_and_writes_collapsed_checkpoint(tmp_path, depth, kind):
    model = ToyModel(kind=kind, lr=0.5, scheduler=True)
    dwf = DWFCallback(depth=depth, lam=0.02, factor_lr=PLAIN_FACTOR_LR)
    x = toy_data(16, kind, seed=3).tensors[0]
    probe = OutputsBeforeCollapse(x)
    logger = CSVLogger(tmp_path, name="csv")
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=3, logger=logger, callbacks=[dwf, probe]))
    trainer.fit(model)

    for key in (
        "dwf/sparsity",
        "dwf/compression_ratio",
        "dwf/misalignment",
        "dwf/penalty",
        "dwf/sparsity/net.0.weight",
    ):
        assert key in trainer.callback_metrics, key
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert any(row.get("dwf/sparsity") for row in rows)
    assert any(row.get("dwf/final/compression_ratio") for row in rows)

    # the model is plain again, and the collapsed checkpoint loads into the plain class, strict, with no callback
    assert not factorized_tensors(model) and type(model.net[0]) in (nn.Linear, nn.Conv2d)
    path = dwf.collapsed_checkpoint_path
    assert path and os.path.isfile(path) and os.path.dirname(path) == trainer.checkpoint_callback.dirpath
    assert not glob.glob(path + ".tmp*")
    loaded = ToyModel.load_from_checkpoint(path)
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), probe.outputs, rtol=1e-4, atol=1e-5)
    assert dwf.final_report is not None
    nonzero = sum(int(m.weight.count_nonzero()) for m in loaded.net if hasattr(m, "weight") and m.weight.dim() > 1)
    assert nonzero == dwf.final_report.nonzero


def test_training_produces_exact_zeros(tmp_path):
    """The whole mechanism works: penalty + LR above the floor gives exact zeros and a compressed model that still
    learns."""
    model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, n=512)
    # above the LR floor (λ = 0.01 is below it: CR ~1.4), below the cliff: λ = 0.03 killed the net for one init of
    # eight on torch 2.11 (all weights zero), λ = 0.02 kept 84-100 % accuracy at CR 120-272 on torch 2.11 and 2.13
    dwf = DWFCallback(depth=3, lam=0.02)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=25, callbacks=[dwf], enable_checkpointing=False))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    assert not [w for w in caught if "below the floor" in str(w.message) or issubclass(w.category, DWFDeadLayerWarning)]
    report = dwf.final_report
    assert report.compression_ratio > 5, report.metrics(per_layer=False)
    assert not report.dead_layers
    assert trainer.callback_metrics["val_acc"] > 0.75  # chance is 0.5; 64 validation samples
    assert os.path.isfile(os.path.join(tmp_path, "dwf-collapsed.ckpt"))


@pytest.mark.parametrize("depth", [2, 3])
def test_dead_network_is_warned_during_training_and_at_collapse(tmp_path, depth):
    """λ far above the cliff zeroes every weight: the callback says so (once while training, again at collapse)."""
    model = ToyModel(lr=0.1, momentum=0.9, n=256)
    dwf = DWFCallback(
        depth=depth, lam=1.0, factor_lr=PLAIN_FACTOR_LR
    )  # each factor shrinks by ~10 % per step: 160 steps kill the net
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=20, callbacks=[dwf], enable_checkpointing=False))
    with pytest.warns(DWFDeadLayerWarning) as caught:
        trainer.fit(model)
    messages = [str(w.message) for w in caught if issubclass(w.category, DWFDeadLayerWarning)]
    assert len(messages) == 2, messages
    assert "at step" in messages[0] and "net.0.weight" in messages[0] and "lower `lam`" in messages[0]
    assert "collapsed model has no non-zero weight" in messages[1]
    assert dwf.final_report.dead_layers == ["net.0.weight", "net.2.weight"]
    assert os.path.isfile(os.path.join(tmp_path, "dwf-collapsed.ckpt"))  # written as trained, with the warning


def test_penalty_applied_once_per_optimizer_step(tmp_path):
    """With a zero data loss, every factor shrinks by exactly (1 - lr·2λ/D) per optimizer step (accumulation
    included)."""
    lam, lr, depth = 0.5, 0.2, 3
    model = ToyModel(lr=lr, zero_loss=True, n=64, batch_size=16)
    dwf = DWFCallback(
        depth=depth, lam=lam, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
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
        depth=3, lam=0.5, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
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


def test_wandb_offline_run_gets_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="dwf-test", offline=True)
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            logger=logger,
            callbacks=[DWFCallback(depth=3, lam=0.01, factor_lr=PLAIN_FACTOR_LR)],
        )
    )
    trainer.fit(ToyModel())
    logger.experiment.finish()
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    assert len(runs) == 1
    blob = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(runs[0], "*.wandb")))
    assert b"dwf/sparsity" in blob and b"dwf/final/compression_ratio" in blob
    summary = glob.glob(os.path.join(runs[0], "files", "wandb-summary.json"))
    if summary:
        assert "dwf/final/sparsity" in json.load(open(summary[0]))


def test_resume_is_exact(tmp_path):
    """A run interrupted after 2 epochs and resumed from its checkpoint ends with the same collapsed model."""

    def run(max_epochs, ckpt_path=None, root="a", seed=0):
        torch.manual_seed(seed)
        model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, t_max=32)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1, save_top_k=-1)
        dwf = DWFCallback(depth=3, lam=0.02, factor_lr=PLAIN_FACTOR_LR)
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=max_epochs, callbacks=[dwf, ckpt]))
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    full, _ = run(4, root="full")
    run(2, root="part")
    # resuming must not depend on the fresh init (run() seeds itself, so the other seed goes through it)
    resumed, trainer = run(4, ckpt_path=str(tmp_path / "part" / "last.ckpt"), root="part", seed=123)
    assert trainer.global_step == 4 * 8
    assert full.state_dict().keys() == resumed.state_dict().keys()
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_dense_checkpoint_starts_dwf_with_balanced_init(tmp_path):
    dense = ToyModel()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1)).fit(dense)
    path = tmp_path / "dense.ckpt"
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1))
    trainer.strategy.connect(dense)
    trainer.save_checkpoint(path, weights_only=True)
    x = toy_data(8).tensors[0]

    class Check(Callback):
        def on_fit_start(self, trainer, pl_module):
            assert factorized_tensors(pl_module)
            with torch.no_grad():
                torch.testing.assert_close(pl_module(x), expected, rtol=1e-5, atol=1e-6)
            self.ok = True

    model = ToyModel.load_from_checkpoint(path)
    with torch.no_grad():
        expected = model(x)
    check = Check()
    Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            callbacks=[
                DWFCallback(
                    depth=3, lam=0.01, factorize=FactorizeConfig(init="balanced"), factor_lr=PLAIN_FACTOR_LR
                ),
                check,
            ],
        )
    ).fit(model)
    assert check.ok


def test_lr_check_warns_and_errors(tmp_path):
    with pytest.warns(DWFLearningRateWarning, match="below the floor"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[DWFCallback(depth=3, lam=1e-4)])).fit(
            ToyModel(lr=0.01)
        )
    with pytest.raises(MisconfigurationException, match="below the floor"):
        Trainer(
            **trainer_kwargs(
                tmp_path,
                max_epochs=1,
                callbacks=[DWFCallback(depth=3, lam=1e-4, factor_lr=FactorLRConfig(check="error"))],
            )
        ).fit(ToyModel(lr=0.01))
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


def test_divergence_is_caught_and_no_checkpoint_written(tmp_path):
    dwf = DWFCallback(depth=3, lam=1e-3, factor_lr=FactorLRConfig(multiplier=1.0, warmup=0.0, check="off", rollbacks=0))
    with pytest.raises(RuntimeError, match="became NaN/Inf") as err:
        Trainer(**trainer_kwargs(tmp_path, max_epochs=3, callbacks=[dwf])).fit(ToyModel(lr=1e4, momentum=0.9))
    step = int(str(err.value).split(" at step ")[1].split(" ")[0])
    assert step <= 3  # the first non-finite loss (the batch after the factors overflow) stops the run
    assert not glob.glob(os.path.join(tmp_path, "**", "dwf-collapsed.ckpt*"), recursive=True)


def test_validate_test_predict_do_not_factorize(tmp_path):
    model = ToyModel()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=0.01)]))
    trainer.validate(model)
    assert not factorized_tensors(model)


@pytest.mark.parametrize(
    "factory, kwargs, error, match",
    [
        (DWFCallback, dict(depth=1, lam=0.1), ValueError, "`depth` must be >= 2"),
        (DWFCallback, dict(depth=2.0, lam=0.1), TypeError, "`depth` must be an int"),
        (DWFCallback, dict(depth=True, lam=0.1), TypeError, "`depth` must be an int"),
        (DWFCallback, dict(depth=3), ValueError, "Give exactly one of `lam`"),
        (DWFCallback, dict(depth=3, lam=0.1, target_sparsity=0.9), ValueError, "Give exactly one of `lam`"),
        (DWFCallback, dict(depth=3, target_sparsity=1.0), ValueError, "`target_sparsity` is a fraction"),
        (DWFCallback, dict(depth=3, target_compression=0.5), ValueError, "`target_compression` .* must be > 1"),
        (ScheduleConfig, dict(recovery=0.9), ValueError, "`recovery` is the fraction of the run"),
        (ScheduleConfig, dict(recovery=True), ValueError, "`recovery` is the fraction of the run"),
        (DWFCallback, dict(depth=3, lam=-1.0), ValueError, "`lam` must be a finite float >= 0"),
        (DWFCallback, dict(depth=3, lam=float("nan")), ValueError, "`lam` must be a finite float >= 0"),
        (DWFCallback, dict(depth=3, lam="0.1"), TypeError, "`lam` must be a finite float"),
        (CollapseConfig, dict(threshold=-1e-7), ValueError, "`threshold` must be a finite float >= 0"),
        (FactorizeConfig, dict(init="xavier"), ValueError, "`init` must be one of"),
        (FactorizeConfig, dict(init_std=-1.0), ValueError, "`init_std` must be"),
        (FactorLRConfig, dict(multiplier=0), ValueError, "`multiplier` must be > 0"),
        (FactorLRConfig, dict(warmup=1.0), ValueError, "`warmup` is the fraction"),
        (FactorLRConfig, dict(check="loud"), ValueError, "`check` must be one of"),
        (
            DWFCallback,
            dict(depth=3, lam=0.1, log_every_n_steps=0),
            ValueError,
            "`log_every_n_steps` must be an int >= 1",
        ),
        (FactorizeConfig, dict(layer_types=["Linearr"]), ValueError, "not a torch.nn layer class name"),
        (FactorizeConfig, dict(layer_types=[]), ValueError, "`layer_types` is empty"),
        (FactorizeConfig, dict(include=[3]), TypeError, "`include` must be a string or a list of strings"),
        (FactorizeConfig, dict(filter_fn="net.0"), TypeError, "`filter_fn` must be a callable"),
        (FactorizeConfig, dict(eps_ratio=2.0), ValueError, "`eps_ratio` must lie in"),
        (ScheduleConfig, dict(gain=-0.1), ValueError, "`gain` must be a finite float >= 0"),
        (ScheduleConfig, dict(control_threshold=0.0), ValueError, "`control_threshold` must be > 0"),
        # the arguments of 0.1 name the config field they moved to
        (
            DWFCallback,
            dict(depth=3, lam=0.1, exclude=["net.2"]),
            TypeError,
            r"factorize=FactorizeConfig\(exclude=...\)",
        ),
        (DWFCallback, dict(depth=3, lam=0.1, factor_lr_multiplier=10), TypeError, r"FactorLRConfig\(multiplier=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, threshold=1e-3), TypeError, r"CollapseConfig\(threshold=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, recovery=0.3), TypeError, r"ScheduleConfig\(recovery=...\)"),
        (DWFCallback, dict(depth=3, lam=0.1, exclued=["net.2"]), TypeError, "unexpected keyword argument 'exclued'"),
        (DWFCallback, dict(depth=3, lam=0.1, factorize="net.2"), TypeError, "`factorize` must be a FactorizeConfig"),
    ],
)
def test_bad_arguments_raise_in_init(factory, kwargs, error, match):
    with pytest.raises(error, match=match):
        factory(**kwargs)


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


def test_checkpoint_of_other_depth_is_refused(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=1,
            callbacks=[DWFCallback(depth=2, lam=0.01, factor_lr=PLAIN_FACTOR_LR), ckpt],
        )
    ).fit(ToyModel())
    with pytest.raises(ValueError, match="factorized with depth 3"):
        Trainer(
            **trainer_kwargs(
                tmp_path,
                max_epochs=2,
                callbacks=[DWFCallback(depth=3, lam=0.01, factor_lr=PLAIN_FACTOR_LR)],
            )
        ).fit(ToyModel(), ckpt_path=str(tmp_path / "last.ckpt"))


def test_mid_fit_checkpoints_load_into_the_plain_class(tmp_path):
    """Checkpoints written during fit hold collapsed weights in state_dict (factors kept aside for resume)."""
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    dwf = DWFCallback(
        depth=3, lam=0.02, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(on_fit_end=False)
    )
    model = ToyModel(lr=0.3)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, ckpt])).fit(model)
    plain = ToyModel.load_from_checkpoint(tmp_path / "last.ckpt")
    x = toy_data(8).tensors[0]
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x), rtol=1e-4, atol=1e-5)
    raw = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert any("original0" in k for k in raw["dwf_factorized_state_dict"])


@pytest.mark.parametrize("kind", ["collapsed", "dense"])
def test_resuming_from_a_plain_checkpoint_is_refused(tmp_path, kind):
    """A dense run's checkpoint gets DWF's explanation; the weights-only collapsed one gets Lightning's own."""
    match = "points to a plain checkpoint" if kind == "dense" else "checkpoint contains only the model"
    if kind == "collapsed":
        dwf = DWFCallback(depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR)
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf])).fit(ToyModel())
        path = dwf.collapsed_checkpoint_path
    else:
        Trainer(
            **trainer_kwargs(tmp_path, max_epochs=1, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        ).fit(ToyModel())
        path = str(tmp_path / "last.ckpt")
    with pytest.raises((ValueError, KeyError), match=match):
        Trainer(
            **trainer_kwargs(
                tmp_path,
                max_epochs=2,
                callbacks=[DWFCallback(depth=3, lam=0.02, factor_lr=PLAIN_FACTOR_LR)],
            )
        ).fit(ToyModel(), ckpt_path=path)


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
