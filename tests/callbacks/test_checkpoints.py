"""Checkpoints: resuming exactly, starting DWF from a dense checkpoint, refusing a checkpoint of another depth or a
plain one, collapsed weights in mid-fit and weights-only checkpoints, and the collapsed checkpoint at fit end (its path,
none at all, or no collapse). The weights-only and the fit-end tests pin the behaviour: they compare exact values (or
float32-exact ones) so that a change of behaviour, not only a crash, fails."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, toy_data, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    FactorizeConfig,
    FixedLamConfig,
    collapse_state_dict,
    factorized_tensors,
)

from .helpers import LINEAR_WEIGHTS, OptToy, zero_fraction


@pytest.mark.parametrize(("opt", "recovery", "stop", "fixed_pattern"), [
    ("sgd", 0.0, 2, "factors"), ("sgd", 0.5, 1, "factors"), ("sgd", 0.5, 3, "factors"), ("adamw", 0.0, 2, "factors"),
    ("sgd", 0.5, 1, "dense"), ("sgd", 0.5, 3, "dense"), ("adamw", 0.5, 3, "dense"),
])
def test_resume_is_exact(tmp_path, opt, recovery, stop, fixed_pattern):
    """A run interrupted after ``stop`` epochs and resumed from its checkpoint ends with the same collapsed model: λ
    fixed, or ramped and released at step 16 of 32 (interrupted before and after the release). AdamW: the decoupled
    shrink and the proximal step use the scheduled LR the resume restored (the penalty looks its param group up at
    every step; ``optimizer.load_state_dict`` replaces the group dicts after the penalty was bound).
    ``fixed_pattern="dense"``: a resume inside the dense phase keeps the dense weights' optimizer state (no second
    reset), one before it enters the phase as the uninterrupted run did."""

    class StopAfter(Callback):  # an interruption: the run plans 4 epochs but stops after `stop`
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.current_epoch + 1 == stop

    def run(interrupt=False, ckpt_path=None, root="a", seed=0):
        torch.manual_seed(seed)
        model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, t_max=32) if opt == "sgd" else OptToy(opt, lr=1e-2)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1, save_top_k=-1)
        lam = 0.02 if opt == "sgd" else 0.3
        factor_lr = dataclasses.replace(PLAIN_FACTOR_LR, fixed_pattern=fixed_pattern)
        dwf = DWFCallback(depth=3, regime=FixedLamConfig(lam, recovery=recovery), factor_lr=factor_lr)
        callbacks = [dwf, ckpt] + ([StopAfter()] if interrupt else [])
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=4, callbacks=callbacks))
        trainer.fit(model, ckpt_path=ckpt_path)
        return model, trainer

    full, _ = run(root="full")
    run(interrupt=True, root="part")
    # resuming must not depend on the fresh init (run() seeds itself, so the other seed goes through it)
    resumed, trainer = run(ckpt_path=str(tmp_path / "part" / "last.ckpt"), root="part", seed=123)
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


def test_weights_only_checkpoint_holds_factors_that_collapse_state_dict_converts(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    dwf = DWFCallback(
        depth=3, lam=0.05, verbose=False, collapse=CollapseConfig(threshold=0.1), factor_lr=PLAIN_FACTOR_LR
    )
    model = ToyModel(lr=0.3, n=64, batch_size=16)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[dwf, ckpt]))
    trainer.fit(model)
    raw = torch.load(ckpt.best_model_path, weights_only=False)
    assert "dwf_factorized_state_dict" not in raw and "optimizer_states" not in raw
    state = raw["state_dict"]
    factor_keys = {f"net.{i}.parametrizations.weight.original{d}" for i in (0, 2) for d in range(3)}
    assert set(state) == factor_keys | {"net.0.bias", "net.2.bias"}
    plain = collapse_state_dict(state, threshold=0.1)
    fresh = ToyModel()
    fresh.load_state_dict(plain, strict=True)
    for i in (0, 2):
        f = [state[f"net.{i}.parametrizations.weight.original{d}"] for d in range(3)]
        product = f[0] * f[1] * f[2]
        expected = torch.where(product.abs() < 0.1, torch.zeros_like(product), product)
        assert torch.equal(fresh.net[i].weight, expected)
        assert torch.equal(fresh.net[i].bias, state[f"net.{i}.bias"])
    assert zero_fraction(fresh.net[i].weight for i in (0, 2)) > 0
    # the file was written after the last step: the model collapsed at fit end is the same, bit for bit
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def collapsed_files(root) -> list[str]:
    return sorted(glob.glob(os.path.join(root, "**", "*collapsed*"), recursive=True))


def test_collapsed_ckpt_path_is_used(tmp_path):
    path = tmp_path / "out" / "x.ckpt"
    dwf = DWFCallback(
        depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(path=str(path))
    )
    model = ToyModel(lr=0.3, n=64)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf], enable_checkpointing=False))
    trainer.fit(model)
    assert dwf.collapsed_checkpoint_path == str(path) and path.is_file()
    assert collapsed_files(tmp_path) == [] and not glob.glob(str(path) + ".tmp*")
    loaded = ToyModel.load_from_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_save_collapsed_false_writes_nothing_but_collapses(tmp_path):
    dwf = DWFCallback(
        depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR, collapse=CollapseConfig(save=False)
    )
    model = ToyModel(lr=0.3, n=64)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf]))
    trainer.fit(model)
    assert dwf.collapsed_checkpoint_path is None
    assert collapsed_files(tmp_path) == []
    assert [os.path.basename(p) for p in glob.glob(os.path.join(tmp_path, "**", "*.ckpt"), recursive=True)] == [
        "epoch=0-step=2.ckpt"
    ]
    assert (
        not factorized_tensors(model) and type(model.net[0]) is nn.Linear and type(model.net[0].weight) is nn.Parameter
    )
    assert dwf.final_report is not None and dwf.final_report.numel == 32 * 32 + 32 * 2


def test_collapse_on_fit_end_false_leaves_the_model_factorized(tmp_path):
    dwf = DWFCallback(
        depth=3,
        lam=0.02,
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        collapse=CollapseConfig(on_fit_end=False),
    )
    model = ToyModel(lr=0.3, n=64)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf], enable_checkpointing=False)).fit(model)
    assert [t.name for t in factorized_tensors(model)] == list(LINEAR_WEIGHTS)
    assert dwf.final_report is None and dwf.collapsed_checkpoint_path is None
    assert collapsed_files(tmp_path) == []
    assert dwf.penalty is not None and not dwf.penalty.bound  # the penalty is unbound from the optimizers
