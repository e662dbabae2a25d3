"""Unstructured zeros that pay on CPU: swap a collapsed ``nn.Linear`` for a CSR sparse-kernel layer where a
measurement on this machine says it is faster, and keep it dense where not.

Whether ``csr @ x.T`` beats dense ``F.linear`` depends on the weight's shape and sparsity, the batch size, the thread
count and the machine's BLAS (on a 2-core CI-class VM: 4× faster at 98 % and batch 64 for 300×784, but 0.4× at batch 1
for 100×300). So :func:`use_sparse_kernels_` decides per layer from a timing it takes itself, with the layer's own
weight, at the batch sizes you serve, in this process, and reports every measurement.

>>> import torch
>>> from torch import nn
>>> torch.manual_seed(0) and None
>>> net = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
>>> with torch.no_grad():
...     _ = net[0].weight.mul_(torch.rand(512, 512) > 0.99)   # 99 % zeros
>>> report = use_sparse_kernels_(net, batch_sizes=(64,), min_run_time=0.05)
>>> [row.name for row in report.layers]   # layer 2 has no zeros: not timed, stays dense
['0']
>>> net(torch.randn(3, 512)).shape
torch.Size([3, 10])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils import benchmark

#: Sparse kernels are used only when they are at least this much faster than dense at every requested batch size.
DEFAULT_MIN_SPEEDUP = 1.1


def _csr(weight: Tensor) -> Tensor:
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return weight.detach().to_sparse_csr()


class SparseLinear(nn.Module):
    """``nn.Linear`` with its weight stored as a CSR tensor, computed as ``(W_csr @ x.T).T + b`` (inference only: the
    weight takes no gradient).

    Args:
        linear: a plain ``nn.Linear`` (collapsed: not parametrized) whose weight and bias are copied.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if parametrize.is_parametrized(linear):
            raise ValueError("SparseLinear takes a plain nn.Linear: collapse the DWF factors first (collapse_).")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", _csr(linear.weight))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.in_features)
        out = (self.weight @ flat.t()).t()
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def to_linear(self) -> nn.Linear:
        """The equivalent dense ``nn.Linear``."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.weight.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        nnz = int(self.weight.values().numel())
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"density={nnz / (self.in_features * self.out_features):.4f}")


def time_linear(weight: Tensor, batch: int, min_run_time: float = 0.2) -> tuple[float, float]:
    """Median seconds per call of dense ``F.linear`` and of the CSR product for ``weight`` on a random batch of
    ``batch`` rows, timed back to back in this process (``torch.utils.benchmark``, the current thread count)."""
    x = torch.randn(batch, weight.shape[1], dtype=weight.dtype, device=weight.device)
    w, csr = weight.detach(), _csr(weight)
    dense = benchmark.Timer("F.linear(x, w)", globals={"F": nn.functional, "x": x, "w": w})
    sparse = benchmark.Timer("(csr @ x.t()).t()", globals={"csr": csr, "x": x})
    return (dense.blocked_autorange(min_run_time=min_run_time).median,
            sparse.blocked_autorange(min_run_time=min_run_time).median)


@dataclass(frozen=True)
class KernelChoice:
    """One layer's measurement: shape, sparsity, per batch size the dense and sparse times (seconds), the choice."""

    name: str
    shape: tuple[int, int]
    sparsity: float
    batch_sizes: tuple[int, ...]
    dense_seconds: tuple[float, ...]
    sparse_seconds: tuple[float, ...]
    sparse: bool

    @property
    def speedups(self) -> tuple[float, ...]:
        """Dense time / sparse time at each batch size (> 1: the sparse kernel is faster)."""
        return tuple(d / s for d, s in zip(self.dense_seconds, self.sparse_seconds, strict=True))


@dataclass(frozen=True)
class SparseKernelReport:
    """What :func:`use_sparse_kernels_` measured and chose, with the thread count it measured at."""

    layers: tuple[KernelChoice, ...]
    threads: int

    @property
    def swapped(self) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers if layer.sparse)

    def table(self) -> str:
        """A markdown table, one row per layer and batch size."""
        rows = [f"| layer | shape | zeros | batch | dense µs | CSR µs | speed-up | kernel |  (threads: {self.threads})",
                "|---|---|---|---|---|---|---|---|"]
        for layer in self.layers:
            for b, d, s in zip(layer.batch_sizes, layer.dense_seconds, layer.sparse_seconds, strict=True):
                rows.append(f"| {layer.name} | {layer.shape[0]}×{layer.shape[1]} | {layer.sparsity:.1%} | {b} | "
                            f"{d * 1e6:.1f} | {s * 1e6:.1f} | {d / s:.2f}× | {'CSR' if layer.sparse else 'dense'} |")
        return "\n".join(rows)


@torch.no_grad()
def use_sparse_kernels_(
    module: nn.Module,
    batch_sizes: Sequence[int] = (1, 64),
    min_speedup: float = DEFAULT_MIN_SPEEDUP,
    min_run_time: float = 0.2,
) -> SparseKernelReport:
    """Swap each plain ``nn.Linear`` of ``module`` with zeros for a :class:`SparseLinear` where the CSR kernel measured
    at least ``min_speedup`` × faster than dense at every one of ``batch_sizes``, in place (CPU, inference).

    Layers without zeros are not timed. Convolutions stay dense (no CPU sparse convolution kernel in torch).

    Args:
        module: a collapsed model (DWF factors collapsed: :func:`~lightning_dwf.collapse_`).
        batch_sizes: the batch sizes you serve (rows of the flattened input).
        min_speedup: the speed-up the sparse kernel must show at every batch size (> 0).
        min_run_time: seconds of timing per layer, kernel and batch size.

    Returns:
        Every measurement and choice (:meth:`SparseKernelReport.table`).
    """
    if not batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise ValueError(f"`batch_sizes` must be ints >= 1 (the batch sizes you serve), got {batch_sizes!r}.")
    if not min_speedup > 0:
        raise ValueError(f"`min_speedup` must be > 0 (e.g. 1.1: 10 % faster), got {min_speedup!r}.")
    choices = []
    for name, layer in list(module.named_modules()):
        if isinstance(layer, nn.Linear) and parametrize.is_parametrized(layer):
            raise ValueError(f"{name!r} is still factorized: collapse the model first (lightning_dwf.collapse_).")
        # subclasses (e.g. attention's out_proj, whose owner reads .weight) and a bare root stay as they are
        if type(layer) is not nn.Linear or not name:
            continue
        if layer.weight.device.type != "cpu":
            raise ValueError(f"{name!r} is on {layer.weight.device}: sparse kernels here are for CPU inference.")
        zeros = float((layer.weight == 0).float().mean())
        if zeros == 0:
            continue
        times = [time_linear(layer.weight, b, min_run_time) for b in batch_sizes]
        faster = all(d >= min_speedup * s for d, s in times)
        choices.append(KernelChoice(name, tuple(layer.weight.shape), zeros, tuple(batch_sizes),
                                    tuple(d for d, _ in times), tuple(s for _, s in times), faster))
        if faster:
            _replace(module, name, SparseLinear(layer))
    return SparseKernelReport(tuple(choices), torch.get_num_threads())


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)
