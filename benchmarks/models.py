"""The benchmark networks and one LightningModule that trains any of them the same way."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def lenet_300_100(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes))


def lenet_5(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, num_classes),
    )


def small_cnn_bn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, num_classes),
    )


MODELS = {"lenet300": lenet_300_100, "lenet5": lenet_5, "cnn-bn": small_cnn_bn}


def vgg11_bn_cifar(num_classes: int = 10) -> nn.Module:
    """VGG-11 with BatchNorm for 3×32×32 inputs (9.2 M weights; the CIFAR variant: one linear classifier)."""
    layers: list[nn.Module] = []
    channels = 3
    for width in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(channels, int(width), 3, padding=1, bias=False), nn.BatchNorm2d(int(width)), nn.ReLU()]
            channels = int(width)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, num_classes))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """ResNet-18 for 3×32×32 inputs (11.2 M weights; the CIFAR variant: 3×3 stem, no max-pool)."""
    blocks: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        blocks += [_BasicBlock(cin, cout, stride), _BasicBlock(cout, cout, 1)]
        cin = cout
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))


#: CIFAR-shaped networks for the overhead benchmark on a GPU (synthetic 3×32×32 inputs; no CIFAR data offline).
CIFAR_MODELS = {"vgg11-bn": vgg11_bn_cifar, "resnet18": resnet18_cifar}
#: Every benchmark network, and its input shape (channels, height, width).
ALL_MODELS = {**MODELS, **CIFAR_MODELS}
INPUT_SHAPES = {name: (1, 28, 28) if name in MODELS else (3, 32, 32) for name in ALL_MODELS}


class Classifier(LightningModule):
    """Any :data:`MODELS` network, SGD with momentum and a per-step cosine schedule (the same for every method)."""

    def __init__(self, model: str = "lenet300", lr: float = 0.1, momentum: float = 0.9, num_classes: int = 10) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = MODELS[model](num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(int(self.trainer.estimated_stepping_batches), 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@torch.no_grad()
@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Test accuracy of ``net`` in eval mode (torchmetrics' micro-averaged multiclass accuracy: the fraction correct)."""
    was_training = net.training
    net.eval()
    metric = None
    for i in range(0, len(y), batch_size):
        logits = net(x[i : i + batch_size])
        metric = metric or MulticlassAccuracy(num_classes=logits.shape[1], average="micro")
        metric.update(logits, y[i : i + batch_size])
    net.train(was_training)
    return float(metric.compute())
