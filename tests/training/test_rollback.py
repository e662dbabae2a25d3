"""The rollback guard: restores the last finite state with the factor step halved, then stops with a named error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dwf import DWFDivergenceError
from lightning_dwf.training.rollback import Rollback


def test_restores_then_halves_then_raises():
    net = nn.Linear(3, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    warned, infos = [], []
    guard = Rollback(allowed=2)
    assert not guard.recover(net, [opt], 0, 3, warned.append, infos.append)  # finite: nothing to do
    guard.take(net, [opt], step=4)
    good = net.weight.detach().clone()
    for n in (1, 2):
        with torch.no_grad():
            net.weight[0, 0] = float("nan")
        assert guard.recover(net, [opt], 5 + n, 3, warned.append, infos.append)
        assert torch.equal(net.weight, good) and guard.count == n and guard.scale == 0.5**n
    assert len(warned) == 1 and "step 4" in warned[0] and len(infos) == 1  # one warning, then info lines
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(DWFDivergenceError, match="NaN/Inf at step 9"):
        guard.recover(net, [opt], 9, 3, warned.append, infos.append)


def test_no_snapshot_means_no_rollback():
    net = nn.Linear(3, 2)
    with torch.no_grad():
        net.weight.fill_(float("nan"))
    with pytest.raises(RuntimeError, match="NaN/Inf"):  # a DWFDivergenceError is a RuntimeError too
        Rollback(allowed=3).recover(net, [], 1, 3, print, print)
    guard = Rollback(allowed=0)
    guard.take(nn.Linear(3, 2), [], 0)  # with no rollback allowed nothing is kept
    assert guard.snapshot.step == -1
