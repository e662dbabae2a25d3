"""CSR sparse kernels against dense on this CPU, for every Linear shape of the benchmark models.

    python -m benchmarks.sparse_kernels            # benchmarks/results/sparse_kernels.{jsonl,md}
    python -m benchmarks.sparse_kernels --threads 1 --min-run-time 0.1
    python -m benchmarks.sparse_kernels --end-to-end --epochs 10   # also a trained model, whole-model latency

For each ``nn.Linear`` weight shape of the benchmark models (LeNet-300-100, LeNet-5, the BN CNN, the ViT) and of a
width-2048 MLP (a model large enough that latency is not framework overhead), at 90 / 98 / 99 % random unstructured
zeros and batch 1 / 64: the median time of dense ``F.linear`` and of ``csr @ x.T``
(:func:`lightning_dwf.inference.time_linear`, ``torch.utils.benchmark``), both timed back to back in this process
at a fixed thread count, and their ratio. Convolutions are listed as dense: torch has no CPU sparse convolution kernel.
Whether :func:`lightning_dwf.inference.use_sparse_kernels_` would take the sparse kernel follows from the ratio
(at least ``DEFAULT_MIN_SPEEDUP`` at the batch sizes served).

``--end-to-end``: LeNet-300-100 trained with ``DWFCallback(target_sparsity=0.98)`` (SGD, the benchmarks' recipe, on the
data ``examples.data.load_dataset`` finds), collapsed, then converted with ``use_sparse_kernels_`` at batch 1 and 64
(and at each alone); whole-model latency of the dense-kernel and the converted model, timed interleaved in this process,
and test accuracy of both (must be equal).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
from pathlib import Path

import torch
from torch import nn
from torch.utils import benchmark

from benchmarks.harness.fit import run_training
from benchmarks.harness.measure import measure as measure_net
from benchmarks.harness.store import RESULTS
from benchmarks.models import MODELS
from examples.data import load_dataset
from lightning_dwf import CollapseConfig, DWFCallback
from lightning_dwf.inference import time_linear, use_sparse_kernels_
from lightning_dwf.inference.sparse_kernels import DEFAULT_MIN_SPEEDUP

SPARSITIES = (0.9, 0.98, 0.99)
BATCHES = (1, 64)
#: A width-2048 MLP: 784 → 2048 → 2048 → 10.
LARGE_MLP_SHAPES = ((2048, 784), (2048, 2048), (10, 2048))


def layer_shapes() -> list[tuple[str, tuple[int, int] | None, str]]:
    """``(model, weight shape or None for a conv, layer kind)`` of every distinct weight layer."""
    out: list[tuple[str, tuple[int, int] | None, str]] = []
    for name, build in MODELS.items():
        seen = set()
        for module in build().modules():
            if isinstance(module, nn.Linear) and tuple(module.weight.shape) not in seen:
                seen.add(tuple(module.weight.shape))
                out.append((name, tuple(module.weight.shape), "Linear"))
            elif isinstance(module, nn.Conv2d):
                out.append((name, None, f"Conv2d {tuple(module.weight.shape)}"))
    out += [("mlp-2048", shape, "Linear") for shape in LARGE_MLP_SHAPES]
    return out


def measure(min_run_time: float) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for model, shape, kind in layer_shapes():
        if shape is None:
            rows.append(dict(model=model, kind=kind, shape=None))
            continue
        for sparsity in SPARSITIES:
            weight = torch.randn(shape) * (torch.rand(shape) >= sparsity)
            for batch in BATCHES:
                dense, sparse = time_linear(weight, batch, min_run_time)
                rows.append(dict(model=model, kind=kind, shape=list(shape), sparsity=sparsity, batch=batch,
                                 dense_us=dense * 1e6, csr_us=sparse * 1e6, speedup=dense / sparse))
                print(f"{model:9s} {shape[0]:5d}×{shape[1]:<5d} {sparsity:.0%} b{batch:<3d} dense {dense * 1e6:9.1f} µs"
                      f"  CSR {sparse * 1e6:9.1f} µs  {dense / sparse:6.2f}×", flush=True)
    return rows


def table(rows: list[dict], threads: int) -> str:
    lines = [
        f"CSR (`csr @ x.T`) against dense `F.linear`, torch {torch.__version__}, {threads} threads, "
        f"{platform.processor() or platform.machine()}; median of `torch.utils.benchmark` runs, random unstructured "
        f"zeros. Speed-up = dense time / CSR time; **bold** where the sparse kernel wins by ≥ {DEFAULT_MIN_SPEEDUP}×.",
        "",
        "| model | weight | zeros | batch 1: dense µs | CSR µs | speed-up | batch 64: dense µs | CSR µs | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    timed = [r for r in rows if r["shape"] is not None]
    for model, shape, sparsity in dict.fromkeys((r["model"], tuple(r["shape"]), r["sparsity"]) for r in timed):
        cells = []
        for batch in BATCHES:
            r = next(r for r in timed if (r["model"], tuple(r["shape"]), r["sparsity"], r["batch"])
                     == (model, shape, sparsity, batch))
            ratio = f"{r['speedup']:.2f}×"
            cells += [f"{r['dense_us']:.1f}", f"{r['csr_us']:.1f}",
                      f"**{ratio}**" if r["speedup"] >= DEFAULT_MIN_SPEEDUP else ratio]
        lines.append(f"| {model} | {shape[0]}×{shape[1]} | {sparsity:.0%} | " + " | ".join(cells) + " |")
    convs = sorted({(r["model"], r["kind"]) for r in rows if r["shape"] is None})
    lines += ["", "Convolutions stay dense (no CPU sparse convolution kernel in torch): "
              + ", ".join(f"{m} {k}" for m, k in convs) + "."]
    return "\n".join(lines) + "\n"


def end_to_end(epochs: int, min_run_time: float) -> str:
    """Train, collapse, convert and time LeNet-300-100 at 98 %; returns a markdown section."""
    data = load_dataset("auto")
    dwf = DWFCallback(depth=3, target_sparsity=0.98, collapse=CollapseConfig(save=False))
    module, seconds = run_training(dict(model="lenet300", epochs=epochs, batch_size=64), data, [dwf])
    dense = module.net.eval()
    lines = [f"End to end: LeNet-300-100, `DWFCallback(depth=3, target_sparsity=0.98)`, {epochs} epochs on "
             f"{data.name} (trained in {seconds:.0f} s), collapsed; whole-model latency, median µs per forward.", "",
             "| converted for batch | layers on CSR | test acc dense-kernel / CSR | batch 1: dense µs | CSR µs | "
             "speed-up | batch 64: dense µs | CSR µs | speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    base = measure_net(dense, data)["acc"]
    for batches in ((1,), (64,), (1, 64)):
        converted = copy.deepcopy(dense)
        report = use_sparse_kernels_(converted, batch_sizes=batches, min_run_time=min_run_time)
        acc = measure_net(converted, data)["acc"]
        cells = []
        for batch in BATCHES:
            x = data.test_x[:batch]
            times = [benchmark.Timer("net(x)", globals={"net": net, "x": x}).blocked_autorange(
                min_run_time=min_run_time).median for net in (dense, converted)]
            cells += [f"{times[0] * 1e6:.1f}", f"{times[1] * 1e6:.1f}", f"{times[0] / times[1]:.2f}×"]
        lines.append(f"| {' and '.join(map(str, batches))} | {', '.join(report.swapped) or 'none'} | "
                     f"{base:.2%} / {acc:.2%} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2, CI's core count)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds of timing per kernel and case")
    parser.add_argument("--out", type=Path, default=RESULTS / "sparse_kernels")
    parser.add_argument("--end-to-end", action="store_true", help="also train, convert and time LeNet-300-100")
    parser.add_argument("--epochs", type=int, default=10, help="--end-to-end: training epochs")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.end_to_end:
        section = end_to_end(args.epochs, args.min_run_time)
        torch.set_num_threads(args.threads)  # Lightning may have changed it
        args.out.with_name(args.out.name + "_end_to_end.md").write_text(section)
    rows = measure(args.min_run_time)
    args.out.with_suffix(".jsonl").write_text("".join(json.dumps(dict(r, threads=args.threads)) + "\n" for r in rows))
    args.out.with_suffix(".md").write_text(table(rows, args.threads))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
