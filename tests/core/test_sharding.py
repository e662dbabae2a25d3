"""The DTensor helpers are the identity on plain tensors, so the single-device and DDP paths run unchanged (their
sharded behaviour is tested with 2 processes in ``tests/callbacks/test_sharded.py``)."""

from __future__ import annotations

import torch
from torch import nn

from lightning_dwf import factorize_
from lightning_dwf.core.factorize import select_tensors
from lightning_dwf.core.sharding import (
    check_not_sharded,
    full_tensor,
    global_count,
    global_sum,
    is_sharded,
    local_shard,
    local_tensor,
    sharded_parameter_names,
)


def test_plain_tensors_pass_through():
    w = torch.randn(4, 3)
    assert not is_sharded(w)
    assert local_tensor(w) is w and full_tensor(w) is w
    mask = w > 0
    assert local_shard(mask, like=w) is mask
    assert global_count(mask) == int(mask.sum())
    assert global_sum([mask.sum(), (~mask).sum()]) == 12
    assert global_sum([]) == 0


def test_a_plain_module_is_not_sharded():
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    check_not_sharded(select_tensors(net))  # no error
    assert sharded_parameter_names(net) == []
    assert factorize_(net, 3) == ["0.weight", "1.weight"]
    assert sharded_parameter_names(net) == []
