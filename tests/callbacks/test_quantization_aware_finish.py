"""The quantization-aware finish (``quantize_bits``) and the compressed export from the callback: the finish lands on
the export grid in target and fixed-λ mode, resuming inside the finish keeps quantizing, its settings are checked, and
the export without quantization is lossless."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_dwf import CollapseConfig, DWFCallback, FixedLamConfig, load_compressed
from lightning_dwf.core.functional import quantize_to_grid


class Recorder(Callback):
    """Records what the loggers receive at fit end, and whether the factorized weights were fake-quantized."""

    def __init__(self) -> None:
        self.quantized_at_start: bool | None = None

    def on_train_start(self, trainer, pl_module):
        plists = [m.parametrizations.weight[0] for m in pl_module.modules() if hasattr(m, "parametrizations")]
        self.quantized_at_start = any(p.quant_bits for p in plists)


@pytest.mark.parametrize("bits", [8, 4])
def test_target_mode_finish_lands_on_the_grid_and_exports_exactly(tmp_path, bits):
    dwf = DWFCallback(depth=3, target_sparsity=0.9, quantize_bits=bits, collapse=CollapseConfig(export=True),
                      verbose=False)
    model = ToyModel(momentum=0.9)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf])).fit(model)
    weights = [model.net[0].weight.detach(), model.net[2].weight.detach()]
    for w in weights:
        assert torch.equal(quantize_to_grid(w, bits), w)  # the collapsed non-zeros lie on the export grid
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros >= 0.9 - 1 / 1088 and zeros == pytest.approx(dwf.final_report.sparsity)
    path = os.path.join(tmp_path, "checkpoints", "dwf-collapsed.safetensors")
    assert dwf.compression_report is not None and dwf.compression_report.path == path
    assert dwf.compression_report.file_bytes == os.path.getsize(path)
    loaded = load_compressed(ToyModel(), path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=1e-6, atol=0)
    plain = ToyModel.load_from_checkpoint(dwf.collapsed_checkpoint_path)  # the .ckpt beside it holds the same
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in model.state_dict().items())


def test_fixed_lam_finish_fixes_the_support_and_releases_lam(tmp_path):
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.02, recovery=0),
    quantize_bits=4, factor_lr=PLAIN_FACTOR_LR, verbose=False,
                      collapse=CollapseConfig(quantize_fraction=0.5))
    model = ToyModel(lr=0.3, momentum=0.9)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf])).fit(model)
    assert dwf.current_lam == 0.0
    for w in (model.net[0].weight.detach(), model.net[2].weight.detach()):
        assert torch.equal(quantize_to_grid(w, 4), w)
    assert dwf.final_report.sparsity > 0.2


def test_resuming_inside_the_finish_keeps_quantizing(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    dwf = DWFCallback(depth=3, target_sparsity=0.9, quantize_bits=4, verbose=False,
                      collapse=CollapseConfig(quantize_fraction=0.5))
    Trainer(**trainer_kwargs(tmp_path, max_epochs=8, callbacks=[dwf, ckpt], enable_checkpointing=True)).fit(
        ToyModel(momentum=0.9))
    full = ToyModel.load_from_checkpoint(dwf.collapsed_checkpoint_path)
    for epoch, quantizing in ((2, False), (5, True)):  # the finish starts at step 32 of 64 (epoch 4)
        recorder = Recorder()
        resumed = DWFCallback(depth=3, target_sparsity=0.9, quantize_bits=4, verbose=False,
                              collapse=CollapseConfig(quantize_fraction=0.5, path=str(tmp_path / f"r{epoch}.ckpt")))
        model = ToyModel(momentum=0.9)
        trainer = Trainer(**trainer_kwargs(tmp_path / f"r{epoch}", max_epochs=8, callbacks=[resumed, recorder]))
        trainer.fit(model, ckpt_path=tmp_path / f"epoch={epoch}.ckpt")
        assert recorder.quantized_at_start is quantizing
        for key, value in full.state_dict().items():
            assert torch.equal(model.state_dict()[key], value), key  # resume is exact, inside the finish too


def test_quantization_settings_are_checked(tmp_path):
    with pytest.raises(ValueError, match="`quantize_bits` must be None"):
        DWFCallback(depth=3, regime=FixedLamConfig(0.01, recovery=0), quantize_bits=2)
    with pytest.raises(ValueError, match="`quantize_fraction` must be > 0"):
        CollapseConfig(quantize_fraction=0.0)
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.01, recovery=0), quantize_bits=8, factor_lr=PLAIN_FACTOR_LR)
    with pytest.raises(MisconfigurationException, match="no step budget"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=-1, max_steps=-1, max_time={"seconds": 5},
                                 callbacks=[dwf])).fit(ToyModel())


def test_export_without_quantization_is_lossless(tmp_path):
    dwf = DWFCallback(depth=3, regime=FixedLamConfig(0.02, recovery=0), factor_lr=PLAIN_FACTOR_LR, verbose=False,
                      collapse=CollapseConfig(export=True, path=str(tmp_path / "out" / "model.ckpt")))
    model = ToyModel(lr=0.3, momentum=0.9)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[dwf])).fit(model)
    loaded = load_compressed(ToyModel(), tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert dwf.compression_report.bits is None
