"""Models, callbacks and constants shared by the integration tests of ``DWFCallback``."""

from __future__ import annotations

import torch
from conftest import ToyModel, trainer_kwargs
from lightning.pytorch import Callback, Trainer

from lightning_dwf import factorized_tensors


class OptToy(ToyModel):
    """:class:`ToyModel` with a choice of optimizer (``opt``) and a per-step cosine schedule."""

    def __init__(self, opt: str = "adamw", **kwargs) -> None:
        super().__init__(**kwargs)
        self.opt = opt

    def configure_optimizers(self):
        lr = self.hparams.lr
        make = {
            "adamw": lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
            "adam": lambda ps: torch.optim.Adam(ps, lr=lr),
            "sgd": lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9),
            "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=lr),
        }[self.opt]
        opt = make(self.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _fit(tmp_path, model, dwf, **kwargs):
    trainer = Trainer(**trainer_kwargs(tmp_path, callbacks=[dwf], enable_checkpointing=False, **kwargs))
    trainer.fit(model)
    return trainer


LINEAR_WEIGHTS = ("net.0.weight", "net.2.weight")


LAM, LR, DEPTH = 0.5, 0.2, 3


SHRINK = 1 - LR * 2 * LAM / DEPTH  # one penalty step of one factor under a zero data loss


class InitialWeights(Callback):
    def on_train_start(self, trainer, pl_module):
        self.weights = {t.name: t.product().detach().clone() for t in factorized_tensors(pl_module)}


def zero_fraction(tensors) -> float:
    tensors = list(tensors)
    return sum(int((t == 0).sum()) for t in tensors) / sum(t.numel() for t in tensors)
