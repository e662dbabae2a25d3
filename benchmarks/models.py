"""The benchmark networks and one LightningModule that trains any of them the same way."""

from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torchmetrics.classification import MulticlassAccuracy


def lenet_300_100(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, num_classes)
    )


def lenet_5(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        nn.ReLU(),
        nn.Linear(120, 84),
        nn.ReLU(),
        nn.Linear(84, num_classes),
    )


def small_cnn_bn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 100),
        nn.ReLU(),
        nn.Linear(100, num_classes),
    )


class _Attention(nn.Module):
    """Multi-head self-attention with explicit ``nn.Linear`` q/k/v/out projections (so DWF's default selection
    factorizes them; ``nn.MultiheadAttention`` keeps its in-projection as a bare Parameter)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape  # widths come from the projections, so a shrink that removes heads keeps this valid
        q, k, v = (proj(x).view(n, t, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(n, t, -1))


class _ViTBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(width), _Attention(width, heads)
        self.ln2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyViT(nn.Module):
    """A small vision transformer for 1×28×28 images: 7×7 patches (16 tokens), Linear patch embedding, learned position
    embedding, pre-LayerNorm blocks, mean-pooled tokens, Linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        patch: int = 7,
        width: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 2,
        image: int = 28,
        channels: int = 1,
    ) -> None:
        super().__init__()
        self.patch = patch
        tokens = (image // patch) ** 2
        self.embed = nn.Linear(channels * patch * patch, width)
        self.pos = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        self.blocks = nn.Sequential(*(_ViTBlock(width, heads, mlp_ratio) for _ in range(depth)))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` → ``(N, tokens, C·patch²)``, row-major over the patch grid."""
        p = self.patch
        n, c, h, w = x.shape
        x = x.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(n, (h // p) * (w // p), c * p * p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.blocks(self.embed(self.patches(x)) + self.pos)
        return self.head(self.norm(tokens).mean(1))


def vit_tiny(num_classes: int = 10) -> nn.Module:
    """:class:`TinyViT` as benchmarked: width 64, 2 blocks, 4 heads, MLP ratio 2 (about 70 k weights)."""
    return TinyViT(num_classes)


MODELS = {"lenet300": lenet_300_100, "lenet5": lenet_5, "cnn-bn": small_cnn_bn, "vit": vit_tiny}


def mlp_2048(num_classes: int = 10) -> nn.Module:
    """784 → 2048 → 2048 → classes: large enough that CPU latency is not framework overhead (5.8 M weights)."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, num_classes)
    )


def vit_mha(num_classes: int = 10) -> nn.Module:
    """:class:`TinyViT` with its blocks written as ``nn.TransformerEncoder`` layers (``nn.MultiheadAttention``,
    pre-LayerNorm, GELU, no dropout): the same sizes, the attention most PyTorch models use."""
    net = TinyViT(num_classes)
    layer = nn.TransformerEncoderLayer(64, 4, 2 * 64, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    net.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    return net


#: Models of the structured speed benchmark only (``benchmarks.structured_speed``).
SPEED_MODELS = {"mlp2048": mlp_2048, "vit-mha": vit_mha}


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
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

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


class WarmupCosine:
    """Per-step LR factor: linear warm-up from ``1/warmup_steps`` to 1 over ``warmup_steps``, then cosine to 0 at
    ``total``."""

    def __init__(self, total: int, warmup_steps: int) -> None:
        self.total, self.warmup_steps = max(total, 1), max(warmup_steps, 0)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(self.total - self.warmup_steps, 1)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


OPTIMIZERS = ("sgd", "adamw")


class Classifier(LightningModule):
    """Any :data:`MODELS` network, trained the same way for every method: SGD with momentum (default) or AdamW, and a
    per-step cosine schedule, optionally after a linear warm-up over the first ``warmup`` fraction of the steps.

    The defaults (``optimizer="sgd"``, ``weight_decay=0``, ``warmup=0``) are the sweep's recipe: SGD and
    ``CosineAnnealingLR`` over every step, exactly as before these options existed. ``fused=True`` builds the
    optimizer with PyTorch's fused kernel (same update up to rounding; ``benchmarks.fit_cost --fused``).
    """

    def __init__(
        self,
        model: str = "lenet300",
        lr: float = 0.1,
        momentum: float = 0.9,
        num_classes: int = 10,
        optimizer: str = "sgd",
        weight_decay: float = 0.0,
        warmup: float = 0.0,
        fused: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {OPTIMIZERS}, got {optimizer!r}.")
        self.save_hyperparameters()
        self.net = {**MODELS, **SPEED_MODELS}[model](num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        """The base optimizer over ``params`` (parameters or param groups)."""
        hp = self.hparams
        fused = {"fused": True} if hp.get("fused") else {}  # unset in checkpoints from before the option
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
        return torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, **fused)

    def make_scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """Cosine over every step (no warm-up: the sweep's ``CosineAnnealingLR``), else warm-up then cosine to 0."""
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if not self.hparams.warmup:
            return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
        return torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total, math.ceil(self.hparams.warmup * total)))

    def configure_optimizers(self):
        opt = self.make_optimizer(self.parameters())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step"}}


@torch.no_grad()
def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Test accuracy of ``net`` in eval mode (torchmetrics' micro-averaged multiclass accuracy: the fraction
    correct)."""
    was_training = net.training
    net.eval()
    metric = None
    for i in range(0, len(y), batch_size):
        logits = net(x[i : i + batch_size])
        metric = metric or MulticlassAccuracy(num_classes=logits.shape[1], average="micro")
        metric.update(logits, y[i : i + batch_size])
    net.train(was_training)
    return float(metric.compute())
