"""Checkpoints written by lightning-dwf 0.1.0 (the committed fixtures) still load and resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FactorSnapshot, ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer

from lightning_dwf import DWFCallback, collapse_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
TARGET, LAM = FIXTURES / "v0_1_target.ckpt", FIXTURES / "v0_1_lam.ckpt"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


class CallbackState(Callback):
    """Records DWFCallback.state_dict() at train start (after the checkpoint was restored)."""

    def on_train_start(self, trainer, pl_module):
        dwf = next(c for c in trainer.callbacks if isinstance(c, DWFCallback))
        self.state = dwf.state_dict()


@pytest.mark.parametrize("path", [TARGET, LAM], ids=["target", "lam"])
def test_old_checkpoint_loads_into_the_plain_class(path):
    ckpt = _load(path)
    model = ToyModel.load_from_checkpoint(path)
    state = model.state_dict()
    assert state.keys() == ckpt["state_dict"].keys()
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(state[key], value), key


def test_old_checkpoint_state_dict_is_the_collapsed_factors():
    ckpt = _load(TARGET)
    threshold = ckpt["callbacks"]["DWFCallback"]["controller"]["threshold"]  # before recovery: the control threshold
    collapsed = collapse_state_dict(ckpt["dwf_factorized_state_dict"], threshold)
    assert collapsed.keys() == ckpt["state_dict"].keys()
    for key, value in collapsed.items():
        assert torch.equal(value, ckpt["state_dict"][key]), key


def test_old_target_checkpoint_resumes_the_controller_exactly(tmp_path):
    ckpt = _load(TARGET)
    saved = ckpt["callbacks"]["DWFCallback"]
    assert saved["controller"]["lam"] > 0 and saved["controller"]["recovery_step"] == -1  # inside the ramp
    probe, snapshot = CallbackState(), FactorSnapshot()
    dwf = DWFCallback(depth=3, target_sparsity=0.9)
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=4, callbacks=[dwf, probe, snapshot]))
    trainer.fit(ToyModel(n=512, momentum=0.9, scheduler=True), ckpt_path=TARGET)
    # every saved field exactly; `lead` (added after 0.1) takes the config's value
    assert {k: v for k, v in probe.state["controller"].items() if k != "lead"} == saved["controller"]
    assert probe.state["lam"] == saved["lam"]
    factors = [v for k, v in ckpt["dwf_factorized_state_dict"].items() if ".original" in k]
    assert len(factors) == len(snapshot.factors) == 6
    for restored, stored in zip(snapshot.factors, factors):
        assert torch.equal(restored, stored)
    assert dwf.final_report is not None and abs(dwf.final_report.sparsity - 0.9) < 1 / dwf.final_report.numel + 1e-9


def test_old_fixed_lam_checkpoint_resumes_and_other_depth_is_refused(tmp_path):
    probe = CallbackState()
    trainer = Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[DWFCallback(depth=2, lam=0.01), probe]))
    trainer.fit(ToyModel(n=512, momentum=0.9, scheduler=True), ckpt_path=LAM)
    assert probe.state["lam"] == 0.01 and probe.state["depth"] == 2
    with pytest.raises(ValueError, match="depth"):
        trainer = Trainer(**trainer_kwargs(tmp_path / "d3", max_epochs=2, callbacks=[DWFCallback(depth=3, lam=0.01)]))
        trainer.fit(ToyModel(n=512, momentum=0.9, scheduler=True), ckpt_path=LAM)
