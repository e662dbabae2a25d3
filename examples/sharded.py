"""DWF under FSDP2: Lightning's ModelParallelStrategy with ``fully_shard`` in ``configure_model``.

Runs on CPU (gloo) or GPUs (nccl); 2 processes:

    python -m torch.distributed.run --standalone --nproc_per_node=2 examples/sharded.py

The factors are created before sharding: layers built in ``__init__`` are factorized by the callback at ``setup``;
layers built in ``configure_model`` must be factorized there, with ``lightning_dwf.factorize_``, before
``fully_shard``. At the end rank zero writes the collapsed checkpoint, gathered from the shards, which the plain class
loads.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import DWFCallback, factorize_

DEPTH = 3


class Classifier(pl.LightningModule):
    """A plain LightningModule that shards itself in ``configure_model`` (the ModelParallelStrategy pattern)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                                 nn.Linear(width, 2))

    def configure_model(self) -> None:
        if self.device_mesh is None or any(isinstance(p, DTensor) for p in self.net.parameters()):
            return  # not under ModelParallelStrategy (e.g. load_from_checkpoint calls this hook), or sharded already
        # DWFCallback factorized the layers of __init__ at setup. Layers built here instead must be factorized
        # here, before sharding: factorize_(layers, depth=DEPTH) (a no-op for the ones already factorized).
        factorize_(self.net, depth=DEPTH)
        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)  # the factors ω1…ωD are the parameters FSDP2 shards
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.0)

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2048, 32, generator=g)
        return DataLoader(TensorDataset(x, (x[:, :3].sum(1) > 0).long()), batch_size=64)


def main() -> None:
    pl.seed_everything(0)  # every rank builds the same layers and factors; FSDP2 keeps each rank's own shard
    dwf = DWFCallback(depth=DEPTH, target_sparsity=0.9, verbose=True)
    trainer = pl.Trainer(
        accelerator="auto", devices=2, max_epochs=4, logger=False, enable_progress_bar=False,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[dwf],
    )
    trainer.fit(Classifier())
    if trainer.is_global_zero:  # the collapsed checkpoint loads into the plain class, without the sharding
        plain = Classifier.load_from_checkpoint(dwf.collapsed_checkpoint_path)
        zeros = sum(int((m.weight == 0).sum()) for m in plain.net if isinstance(m, nn.Linear))
        print(f"plain model from {dwf.collapsed_checkpoint_path}: {zeros} zero weights, "
              f"sparsity {dwf.final_report.sparsity:.2%}")


if __name__ == "__main__":
    main()
