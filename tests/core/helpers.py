"""Small models shared by the core tests: a Linear, a Conv2d+BatchNorm and a Conv1d network, each with an input."""

from __future__ import annotations

import torch
from torch import nn


def _models():
    torch.manual_seed(0)
    return {
        "linear": (nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)), torch.randn(4, 10)),
        "conv": (
            nn.Sequential(
                nn.Conv2d(2, 3, 3),
                nn.BatchNorm2d(3),
                nn.ReLU(),
                nn.Conv1d(3, 2, 1) if False else nn.Flatten(),
                nn.Linear(3 * 4 * 4, 2),
            ).eval(),
            torch.randn(2, 2, 6, 6),
        ),
        "conv1d": (
            nn.Sequential(nn.Conv1d(2, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 6, 2)),
            torch.randn(2, 2, 8),
        ),
    }
