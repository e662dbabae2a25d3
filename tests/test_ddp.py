"""CPU DDP (gloo) through ddp_spawn with 2 processes, as Lightning tests its own callbacks."""

from __future__ import annotations

import glob
import os

import torch
import torch.distributed as dist
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer

from lightning_dwf import DWFCallback, factor_parameters, factorized_tensors


class RankAgreement(Callback):
    """At train end, every rank compares its factors and logged sparsity with rank 0's."""

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([f.detach().flatten() for f in factor_parameters(pl_module)])
        gathered = [torch.empty_like(flat) for _ in range(trainer.world_size)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], g) for g in gathered), "factors drifted apart across ranks"
        sparsity = torch.tensor([float(trainer.callback_metrics["dwf/sparsity"])])
        all_sparsity = [torch.empty_like(sparsity) for _ in range(trainer.world_size)]
        dist.all_gather(all_sparsity, sparsity)
        assert all(torch.equal(all_sparsity[0], s) for s in all_sparsity)


def test_ddp_spawn_two_processes(tmp_path):
    model = ToyModel(lr=0.3, momentum=0.9)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    dwf = DWFCallback(depth=3, lam=0.02, lr_check="off", verbose=False)
    trainer = Trainer(**trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=2, callbacks=[dwf, RankAgreement()]))
    trainer.fit(model)
    # the parent process ends with the collapsed, trained weights (not the initial ones, not factors)
    assert not factorized_tensors(model)
    assert set(model.state_dict()) == set(initial)
    assert not torch.equal(model.state_dict()["net.0.weight"], initial["net.0.weight"])
    paths = glob.glob(os.path.join(tmp_path, "**", "dwf-collapsed.ckpt*"), recursive=True)
    assert len(paths) == 1 and paths[0].endswith(".ckpt")
    loaded = ToyModel.load_from_checkpoint(paths[0])
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, model.state_dict()[k])
