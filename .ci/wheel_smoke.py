"""Packaging check, run from a fresh venv where the wheel (not the checkout) is installed: import every module of the
installed package, then a short fit with the callback, the quantization-aware finish and the compressed export."""

import importlib
import pkgutil
import tempfile

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_dwf
from lightning_dwf import CollapseConfig, DWFCallback, QuantizeConfig, load_compressed


class Tiny(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 2))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def train_dataloader(self):
        x = torch.randn(256, 16)
        return DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=32)


def main() -> None:
    assert "site-packages" in lightning_dwf.__file__, f"not the installed wheel: {lightning_dwf.__file__}"
    modules = [m.name for m in pkgutil.walk_packages(lightning_dwf.__path__, "lightning_dwf.")]
    for name in modules:
        importlib.import_module(name)
    print(f"wheel smoke: {len(modules)} modules imported from {lightning_dwf.__file__}")
    dwf = DWFCallback(depth=3, target_sparsity=0.9, quantize=QuantizeConfig(bits=8),
                      collapse=CollapseConfig(export=True))
    Trainer(default_root_dir=tempfile.mkdtemp(), max_epochs=8, logger=False, enable_progress_bar=False,
            callbacks=[dwf]).fit(Tiny())
    assert abs(dwf.final_report.sparsity - 0.9) <= 1 / 576 and dwf.compression_report.file_bytes > 0
    load_compressed(Tiny(), dwf.compression_report.path)
    print(f"wheel smoke: passed (sparsity {dwf.final_report.sparsity:.4f}, {dwf.compression_report.file_bytes} bytes)")


if __name__ == "__main__":
    main()
