"""Pins the current behaviour of DWFCallback's flat keyword arguments before they move into config objects.

Every test here compares exact values (or float32-exact ones) so that a change of behaviour, not only a crash, fails:
layer selection in a real ``Trainer.fit``, the values and the cadence of the logged metrics, monitoring
``dwf/sparsity``, weights-only checkpoints, where the collapsed checkpoint goes, the init σ, ``configure_model``,
the refusals of fused optimizers under a grad scaler and of sharded strategies, and the exact penalty step under
bf16-mixed.
"""

from __future__ import annotations

import glob
import math
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, build_net, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import (
    CollapseConfig,
    DWFCallback,
    FactorizeConfig,
    collapse_state_dict,
    factor_parameters,
    factorize_,
    factorized_tensors,
)
from lightning_dwf.core.collapse import has_factors

LINEAR_WEIGHTS = ("net.0.weight", "net.2.weight")


# ---------------------------------------------------------------------------------------------------------- helpers
class RecordingLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def rows(self, key: str) -> list[tuple[int | None, dict[str, float]]]:
        return [(step, m) for step, m in self.calls if key in m]


class LogSpy(ToyModel):
    """Records every ``log_dict`` call that carries DWF metrics, with the optimizer step it happened at."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.dwf_logs: list[tuple[int, dict[str, float]]] = []

    def log_dict(self, dictionary, *args, **kwargs):
        if "dwf/sparsity" in dictionary:
            self.dwf_logs.append((self.trainer.global_step, {k: float(v) for k, v in dictionary.items()}))
        return super().log_dict(dictionary, *args, **kwargs)


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


class FactorProbe(Callback):
    """After DWFCallback (callbacks run in list order): the metrics recomputed from the factors at every optimizer
    step."""

    def __init__(self, lam: float, depth: int, threshold: float) -> None:
        self.lam, self.depth, self.threshold = lam, depth, threshold
        self.at: dict[int, dict[str, float]] = {}

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        tensors = factorized_tensors(pl_module)
        weights = {t.name: t.factors[0] * t.factors[1] * t.factors[2] for t in tensors}
        numel = sum(w.numel() for w in weights.values())
        zeros = sum(int((w.abs() < self.threshold).sum()) for w in weights.values())
        self.at[trainer.global_step] = {
            "dwf/factor_penalty": self.lam
            / self.depth
            * sum(float(f.double().pow(2).sum()) for t in tensors for f in t.factors),
            "dwf/penalty": self.lam * sum(float(w.double().abs().pow(2 / self.depth).sum()) for w in weights.values()),
            "dwf/sparsity": zeros / numel,
            **{f"dwf/sparsity/{n}": int((w.abs() < self.threshold).sum()) / w.numel() for n, w in weights.items()},
        }


def f32(x: float) -> float:
    """``x`` as ``LightningModule.log`` hands it on (a float32 tensor)."""
    return float(torch.tensor(x, dtype=torch.float32))


def zero_fraction(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)


# ------------------------------------------------------------------------------------- 1. layer selection in fit
LAM, LR, DEPTH = 0.5, 0.2, 3
SHRINK = 1 - LR * 2 * LAM / DEPTH  # one penalty step of one factor under a zero data loss


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
        depth=DEPTH, lam=LAM, verbose=False, factorize=FactorizeConfig(**kwargs), factor_lr=PLAIN_FACTOR_LR
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
        lam=0.05,
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


# ----------------------------------------------------------------------------------------- 2. logged values
def test_logged_values_match_the_factors_and_the_collapsed_model(tmp_path):
    lam, depth, threshold = 0.05, 3, 0.05
    logger = RecordingLogger()
    probe = FactorProbe(lam, depth, threshold)
    dwf = DWFCallback(
        depth=depth,
        lam=lam,
        verbose=False,
        collapse=CollapseConfig(threshold=threshold),
        factor_lr=PLAIN_FACTOR_LR,
    )
    model = ToyModel(lr=0.3, n=128, batch_size=16)
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=2, logger=logger, callbacks=[dwf, probe], enable_checkpointing=False)
    )
    trainer.fit(model)
    assert trainer.global_step == 16

    rows = logger.rows("dwf/sparsity")
    # Lightning logs with step = optimizer steps taken before the batch: the row at step s holds DWF's values after
    # step s + 1
    assert [step for step, _ in rows] == list(range(16))
    for step, row in rows:
        expected = probe.at[step + 1]
        assert set(k for k in row if k.startswith("dwf/")) == set(expected) | {
            "dwf/misalignment",
            "dwf/compression_ratio",
            "dwf/lam",
            "dwf/rollbacks",
            "dwf/factor_lr_scale",
        }
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, key)
        assert row["dwf/lam"] == f32(lam)
        sparsity = row["dwf/sparsity"]
        assert row["dwf/compression_ratio"] == (
            math.inf if sparsity == 1 else pytest.approx(1 / (1 - sparsity), rel=1e-5)
        )
        assert 0 <= row["dwf/misalignment"] <= 1
    assert 0 < rows[-1][1]["dwf/sparsity"] < 1  # the numbers are not trivial

    # the collapsed model: exact zeros exactly where the last logged sparsity said (nothing changes after the last step)
    weights = [model.net[0].weight.detach(), model.net[2].weight.detach()]
    numel, zeros = sum(w.numel() for w in weights), sum(int((w == 0).sum()) for w in weights)
    assert rows[-1][1]["dwf/sparsity"] == f32(zeros / numel)
    final_rows = logger.rows("dwf/final/sparsity")
    assert len(final_rows) == 1
    step, final = final_rows[0]
    assert step == trainer.global_step
    assert set(final) == {
        f"dwf/final/{k}"
        for k in (
            "sparsity",
            "compression_ratio",
            "misalignment",
            "penalty",
            "factor_penalty",
            "compression_ratio_all_params",
            "threshold",
        )
    }
    assert final["dwf/final/sparsity"] == pytest.approx(zeros / numel, abs=1e-12)
    assert final["dwf/final/compression_ratio"] == pytest.approx(numel / (numel - zeros), rel=1e-12)
    params = list(model.parameters())
    assert final["dwf/final/compression_ratio_all_params"] == pytest.approx(
        sum(p.numel() for p in params) / sum(int(p.count_nonzero()) for p in params), rel=1e-12
    )
    assert final["dwf/final/threshold"] == threshold
    assert final["dwf/final/factor_penalty"] == pytest.approx(probe.at[16]["dwf/factor_penalty"], rel=1e-5)
    assert final["dwf/final/penalty"] == pytest.approx(probe.at[16]["dwf/penalty"], rel=1e-5)
    assert f32(final["dwf/final/misalignment"]) == rows[-1][1]["dwf/misalignment"]
    assert dwf.final_report.nonzero == numel - zeros


@pytest.mark.parametrize(
    "dwf_every, trainer_every, accumulate, expected",
    [
        (3, 1, 1, [3, 6, 8, 9, 12, 15, 16]),  # multiples of 3, plus each epoch's last batch
        (None, 5, 1, [5, 8, 10, 15, 16]),  # None: the Trainer's log_every_n_steps
        (None, 2, 1, [2, 4, 6, 8, 10, 12, 14, 16]),
        (5, 2, 1, [5, 8, 10, 15, 16]),  # the callback's value wins over the Trainer's
        (
            1,
            1,
            2,
            [0, 1, 2, 3, 4, 5, 6, 7, 8],
        ),  # accumulation: once per step (step 0 = the first batch, before any step)
        (3, 1, 2, [0, 3, 4, 6, 8]),
    ],
)
def test_log_cadence(tmp_path, dwf_every, trainer_every, accumulate, expected):
    """DWF logs when ``global_step % every == 0 or trainer.is_last_batch``, at most once per step (checked at
    log_dict)."""
    model = LogSpy(lr=0.1, n=256, batch_size=32)  # 8 batches per epoch, 2 epochs
    dwf = DWFCallback(
        depth=3, lam=0.01, verbose=False, log_every_n_steps=dwf_every, factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(
        **trainer_kwargs(
            tmp_path,
            max_epochs=2,
            log_every_n_steps=trainer_every,
            accumulate_grad_batches=accumulate,
            callbacks=[dwf],
            enable_checkpointing=False,
        )
    )
    trainer.fit(model)
    assert [step for step, _ in model.dwf_logs] == expected


@pytest.mark.parametrize("per_layer", [True, False])
def test_log_per_layer(tmp_path, per_layer):
    logger = RecordingLogger()
    dwf = DWFCallback(
        depth=3,
        lam=0.01,
        verbose=False,
        log_per_layer=per_layer,
        factor_lr=PLAIN_FACTOR_LR,
        factorize=FactorizeConfig(param_names=("weight", "bias"), exclude=["net.2"]),
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, logger=logger, callbacks=[dwf], enable_checkpointing=False)
    )
    trainer.fit(ToyModel(n=64, batch_size=32))
    keys = {k for _, m in logger.calls for k in m if k.startswith("dwf/") and not k.startswith("dwf/final/")}
    base = {"dwf/sparsity", "dwf/compression_ratio", "dwf/misalignment", "dwf/penalty", "dwf/factor_penalty", "dwf/lam",
            "dwf/rollbacks", "dwf/factor_lr_scale"}
    assert keys == base | ({"dwf/sparsity/net.0.weight", "dwf/sparsity/net.0.bias"} if per_layer else set())
    final_keys = {k for _, m in logger.calls for k in m if k.startswith("dwf/final/")}
    assert not any(k.startswith("dwf/final/sparsity/") for k in final_keys)  # never per layer at the end


# ------------------------------------------------------------------------------------- 3. monitoring dwf/sparsity
class EpochSparsity(Callback):
    """Each epoch's last logged ``dwf/sparsity`` (what monitors see), checked against the factors at the DWF
    threshold."""

    def __init__(self, threshold: float, inflate_at: int | None = None) -> None:
        self.threshold, self.inflate_at, self.values = threshold, inflate_at, []

    @torch.no_grad()
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.inflate_at:  # make the sparsity drop: the best epoch is then not the last one
            for f in factor_parameters(pl_module):
                f.mul_(1.5)

    @torch.no_grad()
    def on_train_epoch_end(self, trainer, pl_module):
        value = float(trainer.callback_metrics["dwf/sparsity"])
        weights = [t.product() for t in factorized_tensors(pl_module)]
        assert value == f32(
            sum(int((w.abs() < self.threshold).sum()) for w in weights) / sum(w.numel() for w in weights)
        )
        self.values.append(value)


def test_early_stopping_on_sparsity_threshold_stops_the_run(tmp_path):
    """Zero loss: the weights shrink steadily, so the sparsity at |w| < 0.05 rises epoch by epoch until the
    threshold stops fit."""
    record = EpochSparsity(0.05)
    stop = EarlyStopping(monitor="dwf/sparsity", mode="max", stopping_threshold=0.3, patience=1000)
    dwf = DWFCallback(
        depth=3, lam=0.15, verbose=False, collapse=CollapseConfig(threshold=0.05), factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=20, callbacks=[dwf, record, stop], enable_checkpointing=False)
    )
    trainer.fit(ToyModel(lr=0.1, zero_loss=True, n=64, batch_size=8))
    first = next(i for i, v in enumerate(record.values) if v > 0.3)
    assert first >= 2  # not stopped on the first check
    assert len(record.values) == first + 1 < 20  # stopped at the first epoch above the threshold
    assert trainer.should_stop and stop.stopped_epoch == first
    # Lightning stops on the threshold before it updates best_score: best_score is the epoch before
    assert float(stop.best_score) == record.values[-2]


def test_checkpoint_keeps_the_sparsest_epoch(tmp_path):
    record = EpochSparsity(0.05, inflate_at=2)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="dwf/sparsity", mode="max", save_top_k=1)
    dwf = DWFCallback(
        depth=3, lam=0.15, verbose=False, collapse=CollapseConfig(threshold=0.05), factor_lr=PLAIN_FACTOR_LR
    )
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf, record, ckpt]))
    trainer.fit(ToyModel(lr=0.1, zero_loss=True, n=64, batch_size=8))
    best = max(range(4), key=lambda i: record.values[i])
    assert best == 1 and record.values[1] > record.values[2]  # the sparsity dropped after the inflation
    assert float(ckpt.best_model_score) == record.values[best]
    assert os.path.basename(ckpt.best_model_path) == f"epoch={best}-step={8 * (best + 1)}.ckpt"
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["dwf-collapsed.ckpt", os.path.basename(ckpt.best_model_path)]
    state = torch.load(ckpt.best_model_path, weights_only=False)["state_dict"]
    assert not has_factors(state)  # collapsed at the DWF threshold: its zeros are the monitored sparsity
    assert f32(zero_fraction(state[k] for k in LINEAR_WEIGHTS)) == float(ckpt.best_model_score)


# ------------------------------------------------------------------------------ 4. weights-only checkpoints
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


# ---------------------------------------------------------------------------- 5. end-of-fit options and init σ
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


class InitialWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {t.name: t.product().detach().clone() for t in factorized_tensors(pl_module)}


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
        lam=0.01,
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
        depth=3, lam=0.05, verbose=False, collapse=CollapseConfig(threshold=0.1), factor_lr=PLAIN_FACTOR_LR
    )
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, snap], enable_checkpointing=False)).fit(model)
    assert model.configure_calls == 2  # once by DWF before factorizing, once by Lightning
    assert dwf.factorized_names == list(LINEAR_WEIGHTS) and snap.factorized == set(LINEAR_WEIGHTS)
    assert not factorized_tensors(model) and type(model.net[0]) is nn.Linear
    assert zero_fraction([model.net[0].weight, model.net[2].weight]) == dwf.final_report.sparsity > 0
    assert os.path.isfile(dwf.collapsed_checkpoint_path)


# --------------------------------------------------------------------------------------------------- 6. refusals
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


def test_fused_sgd_on_cpu_16_mixed_trains(tmp_path):
    """On CPU, Lightning turns 16-mixed into bf16-mixed (no grad scaler): fused SGD then trains with the exact
    penalty."""

    class Fused(ToyModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, fused=True)

    snap = InitialWeights()
    model = Fused(lr=LR, zero_loss=True, n=16, batch_size=16)
    dwf = DWFCallback(
        depth=DEPTH,
        lam=LAM,
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        collapse=CollapseConfig(on_fit_end=False),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(
            **trainer_kwargs(
                tmp_path, max_epochs=1, precision="16-mixed", callbacks=[dwf, snap], enable_checkpointing=False
            )
        )
    assert trainer.precision == "bf16-mixed" and getattr(trainer.precision_plugin, "scaler", None) is None
    trainer.fit(model)
    for t in factorized_tensors(model):
        torch.testing.assert_close(t.product(), snap.weights[t.name] * SHRINK**DEPTH)


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused_in_setup(strategy_cls):
    strategy = strategy_cls.__new__(strategy_cls)  # no CUDA, no deepspeed needed: setup only looks at the type
    dwf = DWFCallback(depth=3, lam=0.1)
    model = ToyModel()
    with pytest.raises(
        MisconfigurationException,
        match=rf"does not support {strategy_cls.__name__} yet: sharded parameters .* Use strategy='ddp'",
    ):
        dwf.setup(SimpleNamespace(strategy=strategy), model, "fit")
    assert not factorized_tensors(model)
    dwf.setup(SimpleNamespace(strategy=strategy), model, "validate")  # other stages return before the check


# ----------------------------------------------------------------------------------------- 7. bf16-mixed, exactly
@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_one_penalty_step_is_exact_under_bf16_mixed(tmp_path, precision):
    """Zero loss, plain SGD, one step: every float32 factor becomes ω − lr·(2λ/D)·ω, as the optimizer computes it."""
    snap = FactorSnapshot()
    model = ToyModel(lr=LR, zero_loss=True, n=16, batch_size=16)
    dwf = DWFCallback(
        depth=DEPTH,
        lam=LAM,
        verbose=False,
        factor_lr=PLAIN_FACTOR_LR,
        collapse=CollapseConfig(on_fit_end=False),
    )
    trainer = Trainer(
        **trainer_kwargs(tmp_path, max_epochs=1, precision=precision, callbacks=[dwf, snap], enable_checkpointing=False)
    )
    trainer.fit(model)
    assert trainer.global_step == 1
    factors = factor_parameters(model)
    assert len(factors) == len(snap.factors) == 6
    coef = 2 * LAM / DEPTH
    for end, start in zip(factors, snap.factors):
        assert end.dtype == torch.float32
        grad = torch.zeros_like(start).add_(start, alpha=coef)  # FactorPenalty: grad += 2λ/D·ω on a zero data gradient
        assert torch.equal(end.detach(), start.add(grad, alpha=-LR))  # SGD: ω ← ω − lr·grad
        torch.testing.assert_close(end.detach(), start * SHRINK, rtol=1.3e-6, atol=0)
