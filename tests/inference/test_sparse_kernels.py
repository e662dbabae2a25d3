"""The CSR inference conversion: outputs equal dense, the choice follows the measurement, bad input is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_dwf.inference.sparse_kernels as sk
from lightning_dwf import factorize_
from lightning_dwf.inference import SparseLinear, use_sparse_kernels_


def _sparse_linear(o: int, i: int, zeros: float, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(o, i) >= zeros)
    return layer


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5, 40), (2, 7, 40)])
def test_sparse_linear_equals_dense(bias, shape):
    dense = _sparse_linear(30, 40, 0.9, bias)
    sparse = SparseLinear(dense)
    x = torch.randn(*shape)
    torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)
    back = sparse.to_linear()
    assert torch.equal(back.weight, dense.weight) and (bias is False or torch.equal(back.bias, dense.bias))
    assert "density=" in repr(sparse)


def test_the_choice_follows_the_measurement(monkeypatch):
    net = nn.Sequential(_sparse_linear(64, 64, 0.98), nn.ReLU(), _sparse_linear(32, 64, 0.5), nn.ReLU(),
                        nn.Linear(32, 4))
    net[4].weight.data.fill_(0.1)  # no zeros: never timed
    # pretend: layer 0 is 3× faster sparse at every batch; layer 2 wins at batch 64 but loses at batch 1
    fake = {(64, 1): (3e-6, 1e-6), (64, 64): (3e-5, 1e-5), (32, 1): (1e-6, 2e-6), (32, 64): (3e-5, 1e-5)}
    monkeypatch.setattr(sk, "time_linear", lambda weight, batch, min_run_time: fake[(weight.shape[0], batch)])
    x = torch.randn(3, 64)
    before = net(x)
    report = use_sparse_kernels_(net, batch_sizes=(1, 64))
    assert [c.name for c in report.layers] == ["0", "2"] and report.swapped == ("0",)
    assert isinstance(net[0], SparseLinear) and type(net[2]) is nn.Linear and type(net[4]) is nn.Linear
    assert report.layers[0].speedups == pytest.approx((3.0, 3.0)) and report.layers[1].speedups == pytest.approx(
        (0.5, 3.0))
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)
    assert "| 0 | 64×64 |" in report.table() and "dense |" in report.table()


def test_a_measured_clear_win_is_taken():
    """1024² at 99 % zeros and batch 64: the CSR kernel is several times faster on any CPU measured so far."""
    torch.manual_seed(0)
    net = nn.Sequential(_sparse_linear(1024, 1024, 0.99), nn.ReLU())
    x = torch.randn(64, 1024)
    before = net(x)
    report = use_sparse_kernels_(net, batch_sizes=(64,), min_run_time=0.1)
    assert report.swapped == ("0",), report.table()
    torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def test_bad_input_is_refused():
    net = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="batch_sizes"):
        use_sparse_kernels_(net, batch_sizes=(0,))
    with pytest.raises(ValueError, match="min_speedup"):
        use_sparse_kernels_(net, min_speedup=0)
    factorize_(net, depth=3)
    with pytest.raises(ValueError, match="collapse"):
        use_sparse_kernels_(net)
    with pytest.raises(ValueError, match="collapse"):
        SparseLinear(net[0])
