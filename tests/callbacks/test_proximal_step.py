"""Fixed λ under Adam-type optimizers: the proximal step of λ·|w|^(2/D) after each optimizer step gives exact zeros
(more for a larger λ), and it runs only in fixed-λ mode under a decoupled penalty (never under SGD or in target mode).
The plain-PyTorch proximal step is tested in ``tests/training/test_penalty.py``."""

from __future__ import annotations

import pytest
import torch
from conftest import trainer_kwargs
from lightning.pytorch import Callback, Trainer

from lightning_dwf import CollapseConfig, DWFCallback, FixedLamConfig

from .helpers import OptToy, _fit


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
    """The proximal zeroing runs once per optimizer step with a constant λ under Adam-type optimizers, never under SGD
    with a constant λ (the penalty gradient is the DWF objective there) or in target mode (the cut sets the support)."""
    import lightning_dwf.training.regimes.fixed as callback_module

    calls = []
    real = callback_module.fix_support_
    monkeypatch.setattr(callback_module, "fix_support_", lambda m, t, *rest: calls.append(t) or real(m, t, *rest))
    cases = [  # (optimizer, mode, epochs, prox expected); 2 batches per epoch, accumulated in pairs: 1 step per epoch
        ("adamw", dict(regime=FixedLamConfig(1.0, recovery=0)), 4, True),
        ("sgd", dict(regime=FixedLamConfig(0.02, recovery=0)), 4, False),
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


@pytest.mark.parametrize(("share", "dead"), [(0.1, False), (0.0, True)])
def test_a_too_large_lam_leaves_every_layer_its_share(tmp_path, share, dead):
    """The proximal step's per-layer guard: λ far too large empties the layers only with ``min_layer_share=0``;
    with the default every layer keeps at least one weight (its largest)."""
    torch.manual_seed(0)
    model = OptToy("adamw", lr=1e-2, n=256)
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(5.0, min_layer_share=share), verbose=False,
                      collapse=CollapseConfig(save=False))
    if dead:
        with pytest.warns(UserWarning, match="lower `lam`"):
            _fit(tmp_path, model, dwf, max_epochs=10)
    else:
        _fit(tmp_path, model, dwf, max_epochs=10)
    report = dwf.final_report
    assert report.sparsity > 0.9
    assert bool(report.dead_layers) == dead, report.dead_layers
    if not dead:
        assert all(layer.nonzero >= 1 for layer in report.layers)


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_ramped_lam_makes_exact_zeros_and_keeps_the_pattern_after_release(tmp_path, opt):
    """``FixedLamConfig(recovery=0.5)``: the proximal step makes exact zeros under SGD too, and from the release
    point (half the run) the pattern is fixed: the weights zero then are zero at the end, the others train on."""
    torch.manual_seed(0)
    model = OptToy(opt, lr=0.1 if opt == "sgd" else 1e-2, n=256)
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.1 if opt == "sgd" else 0.3, recovery=0.5), verbose=False,
                      collapse=CollapseConfig(save=False, on_fit_end=False))
    seen = {}

    class Watch(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            regime = dwf._run.regime
            if regime.state_dict().get("fixed_released") and "mask" not in seen:
                seen["mask"], seen["step"] = pl_module.net[0].weight.detach() == 0, trainer.global_step
                seen["lam"] = regime.lam

    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[dwf, Watch()], enable_checkpointing=False, max_epochs=10))
    trainer.fit(model)
    assert seen["step"] == trainer.global_step // 2 and seen["lam"] == 0.0
    final = model.net[0].weight.detach()
    assert 0.3 < float(seen["mask"].float().mean()) < 1.0
    assert bool((final[seen["mask"]] == 0).all())  # the pattern is kept exactly
    assert bool((final[~seen["mask"]] != 0).all())
