"""Which tensors a real ``Trainer.fit`` factorizes and how: layer selection (include, exclude, parameter names, layer
types, ``filter_fn``), an excluded layer training as plain SGD, the init σ, and layers built in ``configure_model``. The
selection, init σ and ``configure_model`` tests pin the behaviour: they compare exact values (or float32-exact ones) so
that a change of behaviour, not only a crash, fails."""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, build_net, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import CollapseConfig, DWFCallback, FactorizeConfig, FixedLamConfig, factorized_tensors

from .helpers import DEPTH, LAM, LINEAR_WEIGHTS, LR, SHRINK, InitialWeights, zero_fraction


class Conv3dModel(ToyModel):
    """A Conv3d + Linear classifier on 4×4×4 volumes."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4 * 4, 2))

    @staticmethod
    def _data(n: int, seed: int) -> TensorDataset:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, 1, 4, 4, 4, generator=g)
        return TensorDataset(x, (x[:, 0, :2, :2, :2].sum(dim=(1, 2, 3)) > 0).long())

    def train_dataloader(self):
        return DataLoader(self._data(self.hparams.n, 0), batch_size=self.hparams.batch_size)

    def val_dataloader(self):
        return DataLoader(self._data(16, 1), batch_size=16)


class TensorSnapshot(Callback):
    """At train start: every module tensor as the module computes it (factor product if factorized), and which are
    factorized."""

    def on_train_start(self, trainer, pl_module):
        self.values, self.factorized = {}, set()
        for mod_name, mod in pl_module.named_modules():
            for pname in ("weight", "bias"):
                if isinstance(getattr(mod, pname, None), torch.Tensor):
                    name = f"{mod_name}.{pname}"
                    self.values[name] = getattr(mod, pname).detach().clone()
                    if parametrize.is_parametrized(mod, pname):
                        self.factorized.add(name)
                    else:
                        assert type(mod._parameters[pname]) is nn.Parameter, name


@pytest.mark.parametrize(
    "kind, kwargs, expected",
    [
        ("linear", dict(include=["net.2"]), ["net.2.weight"]),
        ("linear", dict(include="net.0"), ["net.0.weight"]),
        ("linear", dict(exclude=["net.0"]), ["net.2.weight"]),
        ("linear", dict(include=["net.*"], exclude="net.2"), ["net.0.weight"]),
        ("linear", dict(param_names=("weight", "bias")), ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]),
        ("linear", dict(param_names="bias"), ["net.0.bias", "net.2.bias"]),
        ("conv", dict(layer_types=["BatchNorm2d"], param_names=("weight",)), ["net.1.weight"]),
        ("conv", dict(layer_types=[nn.BatchNorm2d, "Linear"]), ["net.1.weight", "net.4.weight"]),
        ("conv", {}, ["net.0.weight", "net.4.weight"]),
        ("conv3d", dict(layer_types=[nn.Conv3d]), ["net.0.weight"]),
        ("conv3d", {}, ["net.0.weight", "net.3.weight"]),
    ],
    ids=[
        "include",
        "include-str",
        "exclude",
        "include+exclude",
        "biases",
        "only-biases",
        "bn-scale",
        "bn+linear",
        "conv-default",
        "conv3d",
        "conv3d-default",
    ],
)
def test_layer_selection_in_fit(tmp_path, kind, kwargs, expected):
    """Exactly the selected tensors are factorized and penalized; every other tensor is a plain Parameter left
    untouched.

    With a zero data loss and plain SGD, each factor shrinks by ``1 − lr·2λ/D`` per step, so a factorized tensor ends at
    ``initial · (1 − lr·2λ/D)^(D·steps)`` and an unselected one is bit-for-bit its initial value.
    """
    cls = Conv3dModel if kind == "conv3d" else ToyModel
    model = cls(kind="linear" if kind == "conv3d" else kind, lr=LR, zero_loss=True, n=32, batch_size=16)
    dwf = DWFCallback(
        depth=DEPTH, regime=FixedLamConfig(LAM, recovery=0),
        verbose=False, factorize=FactorizeConfig(**kwargs), factor_lr=PLAIN_FACTOR_LR
    )
    snap = TensorSnapshot()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, snap], enable_checkpointing=False))
    trainer.fit(model)
    assert trainer.global_step == 2
    assert dwf.factorized_names == expected
    assert snap.factorized == set(expected)
    assert [layer.name for layer in dwf.final_report.layers] == expected
    # collapsed: no parametrization left, the original layer classes, the plain state_dict keys
    assert not factorized_tensors(model)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    for m in model.modules():
        if m is not model and m is not model.net:
            assert type(m).__module__.startswith("torch.nn"), type(m)
    state = model.state_dict()
    for name, start in snap.values.items():
        if name in expected:
            torch.testing.assert_close(state[name], start * SHRINK ** (DEPTH * 2))
            assert type(dict(model.named_parameters())[name]) is nn.Parameter
        else:
            assert torch.equal(state[name], start), name


class PlainSGDCheck(Callback):
    """Checks that ``net.2.weight`` takes plain SGD steps on the data gradient: ``w ← w − lr·∂loss/∂w``, no penalty."""

    def __init__(self, lr: float) -> None:
        self.lr, self.steps = lr, 0

    def on_after_backward(self, trainer, pl_module):
        layer = pl_module.net[2]
        assert not parametrize.is_parametrized(layer) and type(layer.weight) is nn.Parameter
        self.before = layer.weight.detach().clone()
        self.grad = layer.weight.grad.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        torch.testing.assert_close(
            pl_module.net[2].weight.detach(), self.before.add(self.grad, alpha=-self.lr), rtol=0, atol=1e-7
        )
        self.steps += 1


def test_excluded_layer_trains_dense_with_plain_sgd(tmp_path):
    """A real loss and a penalty strong enough for zeros: the excluded layer steps as plain SGD and ends with no
    exact zero."""
    lr = 0.3
    model = ToyModel(lr=lr, n=128, batch_size=16)
    dwf = DWFCallback(
        depth=3,
        regime=FixedLamConfig(0.05, recovery=0),
        verbose=False,
        collapse=CollapseConfig(threshold=0.1),
        factorize=FactorizeConfig(exclude=["net.2"]),
        factor_lr=PLAIN_FACTOR_LR,
    )
    check = PlainSGDCheck(lr)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, check], enable_checkpointing=False))
    trainer.fit(model)
    assert check.steps == trainer.global_step == 8
    assert dwf.factorized_names == ["net.0.weight"]
    assert int((model.net[0].weight == 0).sum()) > 0  # the factorized layer got exact zeros
    assert int((model.net[2].weight == 0).sum()) == 0  # the excluded one stayed dense
    assert dwf.final_report.numel == model.net[0].weight.numel()


def test_filter_fn_through_the_callback(tmp_path):
    factor_lr = PLAIN_FACTOR_LR
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.01, recovery=0), factor_lr=factor_lr, verbose=False,
                      factorize=FactorizeConfig(filter_fn=lambda module, name: name == "net.2"))
    model = ToyModel()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf])).fit(model)
    assert dwf.factorized_names == ["net.2.weight"]
    assert [layer.name for layer in dwf.final_report.layers] == ["net.2.weight"]


@pytest.mark.parametrize("init_std", ["kaiming", "current", 0.05])
def test_init_std(tmp_path, init_std):
    """The collapsed initial weights satisfy 0.25σ < |w| < 2σ (truncated DWF init) for the σ that ``init_std`` names."""
    model = ToyModel(n=32)
    with torch.no_grad():  # give the layers a spread unlike their kaiming σ = sqrt(2/32) = 0.25
        model.net[0].weight.mul_(0.5)
    sigma = {
        "kaiming": {n: math.sqrt(2 / 32) for n in LINEAR_WEIGHTS},
        "current": {n: float(model.get_parameter(n).detach().std()) for n in LINEAR_WEIGHTS},
        0.05: {n: 0.05 for n in LINEAR_WEIGHTS},
    }[init_std]
    snap = InitialWeights()
    dwf = DWFCallback(
        depth=3,
        regime=FixedLamConfig(0.01, recovery=0),
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        factorize=FactorizeConfig(init_std=init_std),
    )
    Trainer(**trainer_kwargs(tmp_path, max_steps=1, callbacks=[dwf, snap], enable_checkpointing=False)).fit(model)
    assert set(snap.weights) == set(LINEAR_WEIGHTS)
    for name, w in snap.weights.items():
        s = sigma[name]
        magnitude = w.abs()
        assert float(magnitude.min()) > 0.25 * s * (1 - 1e-6), name
        assert float(magnitude.max()) < 2 * s * (1 + 1e-6), name
    big = snap.weights["net.0.weight"]  # 1,024 draws: the spread is near σ (about 0.8σ after truncation)
    assert 0.6 * sigma["net.0.weight"] < float(big.std()) < 1.0 * sigma["net.0.weight"]
    assert float(big.abs().max()) > 1.5 * sigma["net.0.weight"]  # and the bound 2σ is near: σ is not smaller than named


class LazyModel(ToyModel):
    """Builds its network in ``configure_model`` (idempotent), as for large models."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = None
        self.configure_calls = 0

    def configure_model(self) -> None:
        self.configure_calls += 1
        if self.net is None:
            self.net = build_net("linear")


def test_configure_model_layers_are_factorized_and_collapsed(tmp_path):
    model = LazyModel(lr=0.3, n=64)
    snap = TensorSnapshot()
    dwf = DWFCallback(
        depth=3, regime=FixedLamConfig(0.05, recovery=0),
        verbose=False, collapse=CollapseConfig(threshold=0.1), factor_lr=PLAIN_FACTOR_LR
    )
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, snap], enable_checkpointing=False)).fit(model)
    assert model.configure_calls == 2  # once by DWF before factorizing, once by Lightning
    assert dwf.factorized_names == list(LINEAR_WEIGHTS) and snap.factorized == set(LINEAR_WEIGHTS)
    assert not factorized_tensors(model) and type(model.net[0]) is nn.Linear
    assert zero_fraction([model.net[0].weight, model.net[2].weight]) == dwf.final_report.sparsity > 0
    assert os.path.isfile(dwf.collapsed_checkpoint_path)
