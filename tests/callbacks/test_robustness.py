"""DWFCallback together with the rest of Lightning: fitting twice, validate/test/predict before and after fit,
LightningCLI, ``torch.compile``, and a run killed hard mid-epoch that resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import PLAIN_FACTOR_LR, FactorSnapshot, ToyModel, toy_data, trainer_kwargs
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from lightning_dwf import DWFCallback, FactorLRConfig, factorized_tensors


def test_fit_twice_continues_from_the_collapsed_model(tmp_path):
    model = ToyModel(lr=0.3, momentum=0.9)
    dwf = DWFCallback(depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR)
    Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[dwf])).fit(model)
    x = toy_data(8).tensors[0]
    with torch.no_grad():
        after_first = model(x)
    first_zeros = int((model.net[0].weight == 0).sum())

    class Check(FactorSnapshot):
        def on_train_start(self, trainer, pl_module):
            with torch.no_grad():
                torch.testing.assert_close(pl_module(x), after_first, rtol=1e-5, atol=1e-6)
            self.checked = True

    check = Check()
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf, check])).fit(model)
    assert check.checked and not factorized_tensors(model)
    assert int((model.net[0].weight == 0).sum()) >= first_zeros  # exact zeros stay dead


def test_validate_test_predict_before_and_after_fit(tmp_path):
    model = ToyModel()
    dwf = DWFCallback(depth=3, lam=0.01, verbose=False, factor_lr=PLAIN_FACTOR_LR)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf]))
    loader = DataLoader(toy_data(32), batch_size=16)
    for _ in range(2):
        trainer.validate(model, loader)
        trainer.test(model, loader)
        preds = trainer.predict(model, loader)
        assert len(preds) == 2 and not factorized_tensors(model)
        trainer.fit(model)


def test_validate_test_predict_do_not_factorize(tmp_path):
    model = ToyModel()
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[DWFCallback(depth=3, lam=0.01)]))
    trainer.validate(model)
    assert not factorized_tensors(model)


def test_lightning_cli_builds_the_callback(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "dwf.yaml"
    config.write_text(  # the configs as nested mappings
        "trainer:\n  callbacks:\n  - class_path: lightning_dwf.DWFCallback\n    init_args:\n      depth: 4\n"
        "      lam: 0.02\n"
        "      factorize:\n        exclude: [net.2]\n        init_std: 0.05\n      factor_lr:\n        check: 'off'\n"
        "        multiplier: 2.0\n      collapse:\n        threshold: 1.0e-6\n"
    )
    common = [
        "--trainer.max_epochs=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
    ]
    cli = LightningCLI(
        ToyModel,
        run=False,
        save_config_callback=None,
        args=common
        + [
            "--trainer.callbacks+=lightning_dwf.DWFCallback",
            "--trainer.callbacks.depth=3",
            "--trainer.callbacks.lam=0.01",
        ],
    )
    dwf = [c for c in cli.trainer.callbacks if isinstance(c, DWFCallback)]
    assert len(dwf) == 1 and dwf[0].depth == 3 and dwf[0].lam == 0.01
    cli.trainer.fit(cli.model)
    assert dwf[0].final_report is not None
    cli = LightningCLI(ToyModel, run=False, save_config_callback=None, args=[f"--config={config}"] + common)
    dwf = [c for c in cli.trainer.callbacks if isinstance(c, DWFCallback)][0]
    assert (dwf.depth, dwf.lam, dwf.factorize.exclude, dwf.factorize.init_std) == (4, 0.02, ("net.2",), 0.05)
    assert (dwf.factor_lr, dwf.collapse.threshold) == (FactorLRConfig(multiplier=2.0, check="off"), 1e-6)
    cli = LightningCLI(
        ToyModel,
        run=False,
        save_config_callback=None,
        args=common
        + [
            "--trainer.callbacks+=lightning_dwf.DWFCallback",
            "--trainer.callbacks.target_sparsity=0.9",
            "--trainer.callbacks.schedule.recovery=0.3",
            "--trainer.callbacks.factorize.include=[net.0]",
        ],
    )
    dwf = [c for c in cli.trainer.callbacks if isinstance(c, DWFCallback)][0]
    assert (dwf.target_sparsity, dwf.recovery, dwf.factorize.include) == (0.9, 0.3, ("net.0",))
    with pytest.raises(ValueError, match="`depth` must be >= 2"):  # our own message reaches the CLI user
        LightningCLI(
            ToyModel,
            run=False,
            save_config_callback=None,
            args=common
            + [
                "--trainer.callbacks+=lightning_dwf.DWFCallback",
                "--trainer.callbacks.depth=1",
                "--trainer.callbacks.lam=0.01",
            ],
        )


def test_compile(tmp_path):
    """Compiling the inner network works; compiling the whole LightningModule is refused with the alternative."""
    dwf = DWFCallback(depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR)
    with pytest.raises(MisconfigurationException, match=r"self.net = torch.compile\(self.net\)"):
        Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf])).fit(torch.compile(ToyModel()))
    model = ToyModel(lr=0.3)
    model.net = torch.compile(model.net)
    x = toy_data(8).tensors[0]
    Trainer(**trainer_kwargs(tmp_path, max_epochs=1, callbacks=[dwf])).fit(model)
    assert not factorized_tensors(model)
    plain = ToyModel()
    plain.load_state_dict({k.replace("_orig_mod.", ""): v for k, v in model.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(plain(x), model(x))


CRASHING_RUN = """
import os, signal, sys
# {tests!r} is tests/callbacks: its parent holds conftest, the repository root lightning_dwf
sys.path[:0] = [os.path.dirname({tests!r}), os.path.dirname(os.path.dirname({tests!r}))]
import torch
from conftest import PLAIN_FACTOR_LR, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning_dwf import DWFCallback, FactorLRConfig

class Kill(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 20:  # mid-epoch 3 of 4 (8 steps per epoch)
            os.kill(os.getpid(), signal.SIGKILL)

torch.manual_seed(0)
ckpt = ModelCheckpoint(dirpath={root!r}, save_last=True, every_n_epochs=1)
dwf = DWFCallback(depth=3, lam=0.02, factor_lr=PLAIN_FACTOR_LR)
trainer = Trainer(**trainer_kwargs({root!r}, max_epochs=4, callbacks=[dwf, ckpt, Kill()]))
trainer.fit(ToyModel(lr=0.3, momentum=0.9, scheduler=True, t_max=32))
"""


def test_sigkill_mid_epoch_then_resume_from_last(tmp_path):
    """A run killed hard mid-epoch resumes from its last checkpoint and ends with the same collapsed model as an
    uninterrupted run."""
    import os
    import subprocess
    import sys

    from lightning.pytorch.callbacks import ModelCheckpoint

    root = str(tmp_path / "crash")
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_RUN.format(tests=os.path.dirname(__file__), root=root))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert sorted(os.listdir(root)) == ["epoch=1-step=16.ckpt", "last.ckpt"]  # no half-written file

    def fit(directory, ckpt_path=None):
        torch.manual_seed(0)
        model = ToyModel(lr=0.3, momentum=0.9, scheduler=True, t_max=32)
        ckpt = ModelCheckpoint(dirpath=directory, save_last=True, every_n_epochs=1)
        dwf = DWFCallback(depth=3, lam=0.02, verbose=False, factor_lr=PLAIN_FACTOR_LR)
        Trainer(**trainer_kwargs(directory, max_epochs=4, callbacks=[dwf, ckpt])).fit(model, ckpt_path=ckpt_path)
        return model

    resumed = fit(root, ckpt_path="last")
    uninterrupted = fit(str(tmp_path / "clean"))
    assert uninterrupted.state_dict().keys() == resumed.state_dict().keys()
    for (name, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
