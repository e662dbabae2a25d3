"""Structured DWF (D-Gating) through the Trainer: exact zero groups under SGD and AdamW with a fixed λ, an exact
fraction of groups in target mode, group metrics, an exact mid-fit resume, identical gates on two DDP ranks, and the
collapsed checkpoint that loads into the plain class and shrinks."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_dwf import DWFCallback, FactorizeConfig, FixedLamConfig, ScheduleConfig, gated_tensors, shrink_
from lightning_dwf.inference import count_macs_and_params

from .helpers import OptToy, _fit
from .test_ddp import RankAgreement

STRUCTURED = FactorizeConfig(structure="outputs", exclude=["net.2", "net.4"])


def silent_rows(layer) -> int:
    return int(((layer.weight.reshape(layer.weight.shape[0], -1).abs().sum(1) == 0) & (layer.bias == 0)).sum())


# AdamW's λ: its prox threshold grows with lr × the gates' factor LR multiplier (×10 under Adam-type optimizers)
@pytest.mark.parametrize("opt, lam, lr, epochs", [("sgd", 0.1, 0.1, 12), ("adamw", 0.1, 0.05, 8)])
@pytest.mark.parametrize("recovery", [None, 0])
def test_fixed_lam_gates_reach_exact_zero(tmp_path, opt, lam, lr, epochs, recovery):
    """A fixed λ, ramped (the default) or constant, silences whole neurons (weights and bias exactly 0) and keeps
    enough to classify."""
    torch.manual_seed(0)
    model = OptToy(opt=opt, lr=lr, n=512)
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(lam, recovery=recovery), factorize=STRUCTURED)
    trainer = _fit(tmp_path, model, dwf, max_epochs=epochs)
    assert not gated_tensors(model)
    zero = silent_rows(model.net[0])
    assert 0 < zero < 32
    assert float(trainer.callback_metrics["val_acc"]) > 0.8
    assert dwf.final_report.group_sparsity == pytest.approx(zero / 32)


@pytest.mark.parametrize("kind, layer, groups", [("linear", 0, 32), ("conv", 1, 4)])
@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_target_mode_meets_a_fraction_of_groups_exactly(tmp_path, kind, layer, groups, opt):
    """target_sparsity is a fraction of groups: exactly half the neurons (or BatchNorm channels) are silent."""
    torch.manual_seed(0)
    model = OptToy(opt=opt, kind=kind, lr=0.05 if opt == "sgd" else 0.01, n=512)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=FactorizeConfig(structure="outputs", exclude=["net.4"]))
    trainer = _fit(tmp_path, model, dwf, max_epochs=4)
    module = model.net[layer]
    zero = int(((module.weight == 0) & (module.bias == 0)).sum()) if kind == "conv" else silent_rows(module)
    assert zero == groups // 2
    assert dwf.final_report.group_sparsity == 0.5
    assert float(trainer.callback_metrics["dwf/group_sparsity"]) == 0.5


def test_group_metrics_are_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    torch.manual_seed(0)
    model = OptToy(opt="adamw", lr=0.01, n=512)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=STRUCTURED)
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[dwf], enable_checkpointing=False, max_epochs=4,
                                       logger=CSVLogger(tmp_path)))
    trainer.fit(model)
    (path,) = glob.glob(os.path.join(tmp_path, "**", "metrics.csv"), recursive=True)
    header = open(path).readline()
    assert "dwf/group_sparsity" in header and "dwf/group_sparsity/net.0.weight" in header


def test_resume_is_exact(tmp_path):
    """A structured target-mode run interrupted mid-fit and resumed ends with the same collapsed model."""

    class StopAfter(Callback):  # the run is planned for 4 epochs (the schedule depends on it) and killed after 2
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                trainer.should_stop = True

    def run(ckpt_path=None, root="a", seed=0, stop=False):
        torch.manual_seed(seed)
        model = ToyModel(lr=0.1, momentum=0.9, scheduler=True, t_max=64, n=512)
        ckpt = ModelCheckpoint(dirpath=tmp_path / root, save_last=True, every_n_epochs=1, save_top_k=-1)
        dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=STRUCTURED)
        callbacks = [dwf, ckpt] + ([StopAfter()] if stop else [])
        trainer = Trainer(**trainer_kwargs(tmp_path / root, max_epochs=4, callbacks=callbacks))
        trainer.fit(model, ckpt_path=ckpt_path)
        return model

    full = run(root="full")
    run(root="part", stop=True)
    resumed = run(ckpt_path=str(tmp_path / "part" / "last.ckpt"), root="part", seed=123)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    assert silent_rows(full.net[0]) == 16


def test_ddp_ranks_hold_identical_gates(tmp_path):
    """Two ddp_spawn ranks end every step with the same ω, gates and logged group sparsity."""
    model = ToyModel(lr=0.1, momentum=0.9, n=1024)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=STRUCTURED,
                      schedule=ScheduleConfig(recovery=0.4))
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=4,
                                       callbacks=[dwf, RankAgreement()]))
    trainer.fit(model)
    assert silent_rows(model.net[0]) == 16


def test_collapsed_checkpoint_loads_into_the_plain_class_and_shrinks(tmp_path):
    torch.manual_seed(0)
    model = ToyModel(lr=0.1, momentum=0.9, n=512)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=STRUCTURED)
    _fit(tmp_path, model, dwf, max_epochs=4)
    loaded = ToyModel.load_from_checkpoint(dwf.collapsed_checkpoint_path).eval()
    x = torch.randn(8, 32)
    expected = loaded(x)
    report = shrink_(loaded, x)
    assert loaded.net[0].out_features == 16 and loaded.net[2].in_features == 16
    torch.testing.assert_close(loaded(x), expected, atol=1e-5, rtol=1e-5)
    assert report.params_after < report.params_before


@pytest.mark.parametrize("measure, budget", [("macs", 0.25), ("params", 0.4)])
def test_budget_is_met_by_the_shrunk_model(tmp_path, measure, budget):
    """BudgetConfig: the shrunk model's MACs (or parameters) are at most the budget, and within one step of the cut
    above it; the shrunk model computes what the collapsed one does."""
    from lightning_dwf import BudgetConfig
    from lightning_dwf.training.budget import layer_macs

    torch.manual_seed(0)
    model = OptToy(opt="sgd", kind="conv", lr=0.05, n=512)
    x = torch.randn(4, 1, 8, 8)
    dense_macs = sum(layer_macs(model.net, x).values())
    dense_params = sum(p.numel() for p in model.parameters())
    dwf = DWFCallback(depth=3, regime=BudgetConfig(budget, measure=measure, example_inputs=x),
                      factorize=FactorizeConfig(structure="outputs", exclude=["net.4"]))
    trainer = _fit(tmp_path, model, dwf, max_epochs=4)
    assert float(trainer.callback_metrics["dwf/shrunk_cost"]) <= budget
    model.eval()
    expected = model(x)
    report = shrink_(model, x)
    cost = sum(layer_macs(model.net, x).values()) / dense_macs if measure == "macs" else \
        sum(p.numel() for p in model.parameters()) / dense_params
    assert cost <= budget and report.removed
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_the_budget_cuts_at_every_third_control_step(tmp_path, monkeypatch):
    """λ is steered at every control step, the support cut along the ramp at every third (``Budget.cut_every``: a cut
    ranks every group and searches the cost model), then once to the budget where the recovery phase starts."""
    from lightning_dwf import BudgetConfig
    from lightning_dwf.training.regimes.budget import Budget

    cuts, cut = [], Budget._cut

    def counted(self, ctx, sparsity):
        cuts.append(ctx.step)
        return cut(self, ctx, sparsity)

    monkeypatch.setattr(Budget, "_cut", counted)
    torch.manual_seed(0)
    model = OptToy(opt="sgd", kind="conv", lr=0.05, n=512)
    dwf = DWFCallback(depth=3, regime=BudgetConfig(0.5, example_inputs=torch.randn(4, 1, 8, 8)),
                      factorize=FactorizeConfig(structure="outputs", exclude=["net.4"]))
    _fit(tmp_path, model, dwf, max_epochs=4)
    regime = dwf._run.regime
    period, recovery = regime._interval * Budget.cut_every, regime.controller.recovery_step
    assert Budget.cut_every == 3 and recovery > 3 * period
    assert cuts == [*range(period, recovery, period), recovery]


def test_an_unreachable_budget_is_refused_at_train_start(tmp_path):
    from lightning_dwf import BudgetConfig

    model = ToyModel(n=512)
    dwf = DWFCallback(depth=3, regime=BudgetConfig(0.02, measure="params", example_inputs=torch.randn(2, 32)),
                      factorize=STRUCTURED)
    with pytest.raises(Exception, match="cannot be met"):
        _fit(tmp_path, model, dwf, max_epochs=4)
    with pytest.raises(ValueError, match="budget"):
        BudgetConfig(1.5)


def test_quantization_aware_finish_needs_unstructured_layers(tmp_path):
    from lightning_dwf import QuantizeConfig

    dwf = DWFCallback(depth=3, target_sparsity=0.5, quantize=QuantizeConfig(bits=4),
                      factorize=FactorizeConfig(structure="outputs"))
    with pytest.raises(Exception, match="gated"):
        _fit(tmp_path, ToyModel(n=512), dwf, max_epochs=4)


def test_structured_and_unstructured_layers_mix_in_one_fit(tmp_path):
    """One model, one callback: the first layer gated by neurons, the second factorized weight by weight; target mode
    counts both kinds of unit (groups and weights) and both end with exact zeros."""
    torch.manual_seed(0)
    model = OptToy(opt="adamw", lr=0.01, n=512)
    dwf = DWFCallback(depth=3, target_sparsity=0.5, factorize=FactorizeConfig(structure={"net.0": "outputs"}))
    _fit(tmp_path, model, dwf, max_epochs=4)
    report = dwf.final_report
    assert {layer.name: layer.groups for layer in report.layers} == {"net.0.weight": 32, "net.2.weight": 0}
    assert silent_rows(model.net[0]) > 0 and int((model.net[2].weight == 0).sum()) > 0
    assert report.unit_sparsity == pytest.approx(0.5, abs=1 / (32 + 64))


class TokenEncoder(torch.nn.Module):
    """:func:`toy_data`'s 32 inputs as 4 tokens of 8 → ``nn.TransformerEncoder`` (nn.MultiheadAttention, 4 heads of 4,
    2 layers) → mean over tokens → 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 16)
        layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
        self.enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.embed(x.view(x.shape[0], 4, 8))).mean(1))


class AttentionToy(ToyModel):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net = TokenEncoder()


def test_heads_of_multihead_attention_go_after_a_fit(tmp_path):
    """Target mode on nn.MultiheadAttention's heads: exactly half the heads are silent after the fit, and shrink_
    removes them (rewriting the modules with Linear projections) without changing the outputs."""
    torch.manual_seed(0)
    model = AttentionToy(lr=0.05, momentum=0.9, n=512)
    attention = "net.enc.layers.*.self_attn"
    dwf = DWFCallback(depth=3, target_sparsity=0.5,
                      factorize=FactorizeConfig(structure={attention: "heads"}, include=[attention]))
    _fit(tmp_path, model, dwf, max_epochs=4)
    assert dwf.final_report.group_sparsity == 0.5
    model.eval()
    x = torch.randn(8, 32)
    expected = model(x)
    report = shrink_(model, x)
    assert report.attention == ["net.enc.layers.0.self_attn", "net.enc.layers.1.self_attn"]
    assert sum(4 - count for _, count in report.heads.values()) == 4
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("measure", ["macs", "params"])
def test_a_budget_counts_and_removes_multihead_attention_heads(tmp_path, measure):
    """BudgetConfig on nn.MultiheadAttention's heads (and the feed-forward neurons): the cost model sees the packed
    projections as the Linear ones shrink_ rewrites them into, so the shrunk model's cost is the predicted one, within
    the budget; with no silent head the module stays packed and counts the same."""
    from lightning_dwf import BudgetConfig

    torch.manual_seed(0)
    model = AttentionToy(lr=0.05, momentum=0.9, n=512)
    x = torch.randn(4, 32)
    dense = count_macs_and_params(model, x)
    attention, feedforward = "net.enc.layers.*.self_attn", "net.enc.layers.*.linear1"
    dwf = DWFCallback(depth=3, regime=BudgetConfig(0.6, measure=measure, example_inputs=x),
                      factorize=FactorizeConfig(structure={attention: "heads", feedforward: "outputs"},
                                                include=[attention, feedforward]))
    trainer = _fit(tmp_path, model, dwf, max_epochs=4)
    predicted = float(trainer.callback_metrics["dwf/shrunk_cost"])
    model.eval()
    expected = model(x)
    report = shrink_(model, x)
    shrunk = count_macs_and_params(model, x)
    cost = shrunk[0] / dense[0] if measure == "macs" else shrunk[1] / dense[1]
    assert report.heads and cost == pytest.approx(predicted, rel=1e-6) and cost <= 0.6
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
