"""Tiny BoringModel-style modules shared by the tests (Lightning's own test style)."""

from __future__ import annotations

import glob
import os
import time

import pytest
import torch
from lightning.pytorch import Callback, LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import FactorLRConfig

#: The factors at the optimizer's own LR (no auto multiplier, no warm-up), unchecked, and the SGD step cap of 3 in every
#: phase (one dense step while the pattern is made would bind on the toys' large weights): for tests that pin the
#: mechanics' arithmetic.
PLAIN_FACTOR_LR = FactorLRConfig(multiplier=1.0, warmup=0.0, check="off", pattern_step_cap=None)

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# wandb ≥ 0.31 records nothing into the offline run file when it wraps a stdout that pytest has captured
os.environ.setdefault("WANDB_CONSOLE", "off")


def wandb_run_records(run: str, *needles: bytes, timeout: float = 30.0) -> bytes:
    """The bytes of the offline W&B run ``run``'s ``*.wandb`` files, read again until every one of ``needles`` is in
    them or ``timeout`` seconds have passed: W&B's service can still be writing the records when ``finish`` returns
    (seen once on a loaded 2-core machine, the file holding only its header)."""
    deadline = time.monotonic() + timeout
    while True:
        blob = b"".join(open(p, "rb").read() for p in glob.glob(os.path.join(run, "*.wandb")))
        if all(n in blob for n in needles) or time.monotonic() > deadline:
            return blob
        time.sleep(0.5)


def toy_data(n: int = 256, kind: str = "linear", seed: int = 0) -> TensorDataset:
    """A learnable classification task whose label depends on only a few inputs (so sparsity helps)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "conv":
        x = torch.randn(n, 1, 8, 8, generator=g)
        y = (x[:, 0, 2:4, 2:4].sum(dim=(1, 2)) > 0).long()
    else:
        x = torch.randn(n, 32, generator=g)
        y = (x[:, :3].sum(dim=1) > 0).long()
    return TensorDataset(x, y)


def build_net(kind: str) -> nn.Module:
    if kind == "conv":
        return nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)
        )
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))


class ToyModel(LightningModule):
    """Linear or Conv+BatchNorm classifier on :func:`toy_data`; plain SGD (+ optional cosine schedule)."""

    def __init__(
        self,
        kind: str = "linear",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        scheduler: bool = False,
        n: int = 256,
        batch_size: int = 32,
        zero_loss: bool = False,
        t_max: int | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = build_net(kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if self.hparams.zero_loss:
            loss = loss * 0.0
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def predict_step(self, batch, batch_idx):
        return self(batch[0])

    def configure_optimizers(self):
        opt = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            weight_decay=self.hparams.weight_decay,
        )
        if not self.hparams.scheduler:
            return opt
        t_max = self.hparams.t_max or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t_max)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self):
        return DataLoader(
            toy_data(self.hparams.n, self.hparams.kind), batch_size=self.hparams.batch_size, shuffle=False
        )

    def val_dataloader(self):
        return DataLoader(toy_data(64, self.hparams.kind, seed=1), batch_size=64)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


#: Why a test of ``fused=True`` skips: the fused CPU kernels of SGD/AdamW arrived in torch 2.4; the project allows 2.2.
NO_FUSED_CPU = "fused CPU optimizer kernels need torch >= 2.4 (lightning-dwf supports torch >= 2.2)"


def fused_on_cpu(optimizer: type[torch.optim.Optimizer]) -> bool:
    """Whether this torch has ``optimizer``'s fused kernel for CPU tensors (torch >= 2.4; the project allows 2.2)."""
    param = nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    try:
        optimizer([param], lr=0.1, fused=True).step()
    except (RuntimeError, TypeError):
        return False
    return True


def trainer_kwargs(tmp_path, **overrides):
    """Lightning's test defaults: CPU, quiet, short."""
    kwargs = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_epochs=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        log_every_n_steps=1,
        num_sanity_val_steps=0,
    )
    kwargs.update(overrides)
    return kwargs


class FactorSnapshot(Callback):
    """Copies every factor at train start (after DWF factorized and any checkpoint was restored)."""

    def on_train_start(self, trainer, pl_module):
        from lightning_dwf import factor_parameters

        self.factors = [f.detach().clone() for f in factor_parameters(pl_module)]


#: The factorization depths the unit tests of the math, the init, factorize, collapse and the penalty run over.
DEPTHS = [2, 3, 4]
