"""Memory per rank and step time of DWF under FSDP2 (ModelParallelStrategy + ``fully_shard``) against DDP, 2 CPU
processes (gloo), the same model, D, optimizer and data.

    python -m benchmarks.sharded            # both strategies, one torchrun each; writes benchmarks/results/sharded.md

Per rank it measures (a Lightning callback inside ``Trainer.fit`` with ``DWFCallback(depth=D, lam=...)``):

* **training state**: the bytes this rank holds of parameters (factors: local shards under FSDP2), gradients and
  optimizer state, counted after a step;
* **peak RSS in training**: the process's peak resident memory during the training steps (``VmHWM``, reset at train
  start through ``/proc/self/clear_refs``) minus its resident memory before the model was built: parameters,
  gradients, optimizer state, activations, all-gathered layers and communication buffers, without the set-up (on CPU
  every rank first builds the whole model; on GPUs one would build it on the meta device) and without the fit-end
  gather of the collapsed checkpoint. glibc is told to return freed large blocks (``MALLOC_MMAP_THRESHOLD_``), so the
  resident memory follows the live tensors;
* **step time**: the median wall time from batch start to batch end over the steps after the first ``WARMUP``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

WIDTH, LAYERS, DEPTH, BATCH, STEPS, WARMUP, LAM = 1024, 4, 3, 64, 40, 10, 0.01


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """The process's peak resident memory since start or the last :func:`_reset_peak` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _local_bytes(t: torch.Tensor) -> int:
    from lightning_dwf.core.sharding import local_tensor

    t = local_tensor(t)
    return t.numel() * t.element_size()


def run_rank(strategy: str, method: str, out: str, tag: str) -> None:
    """One rank of one strategy and method ("dwf" or "dense"), under torchrun; writes ``<tag>-rank<r>.json``."""
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_dwf import DWFCallback, FactorLRConfig

    class MLP(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(*[m for _ in range(LAYERS) for m in (nn.Linear(WIDTH, WIDTH), nn.ReLU())],
                                     nn.Linear(WIDTH, 10))

        def configure_model(self) -> None:
            if isinstance(self.trainer.strategy, ModelParallelStrategy):
                mesh = self.device_mesh["data_parallel"]
                for layer in self.net:
                    if isinstance(layer, nn.Linear):
                        fully_shard(layer, mesh=mesh)
                fully_shard(self.net, mesh=mesh)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.0)

        def train_dataloader(self):
            g = torch.Generator().manual_seed(0)
            n = BATCH * STEPS * 2
            x, y = torch.randn(n, WIDTH, generator=g), torch.randint(0, 10, (n,), generator=g)
            return DataLoader(TensorDataset(x, y), batch_size=BATCH)

    class Measure(pl.Callback):
        def __init__(self) -> None:
            self.rss0, self.times, self.state = _rss_mib(), [], 0  # before the model is built

        def on_train_start(self, trainer, pl_module):
            _reset_peak()

        def on_train_end(self, trainer, pl_module):
            self.peak = _peak_rss_mib()

        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, *args):
            self.times.append(time.perf_counter() - self.t0)
            if trainer.global_step == WARMUP:
                opt = trainer.optimizers[0]
                params = list(pl_module.parameters())
                self.state = (sum(_local_bytes(p) for p in params)
                              + sum(_local_bytes(p.grad) for p in params if p.grad is not None)
                              + sum(_local_bytes(v) for s in opt.state.values() for v in s.values()
                                    if torch.is_tensor(v) and v.dim() > 0))

    pl.seed_everything(0)
    measure = Measure()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
        strategy="ddp" if strategy == "ddp" else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        callbacks=[measure] + ([DWFCallback(depth=DEPTH, lam=LAM, factor_lr=FactorLRConfig(check="off"),
                                            log_pictures=False)] if method == "dwf" else []),
    )
    trainer.fit(MLP())
    result = {"strategy": strategy, "method": method, "rank": trainer.global_rank, "state_mib": measure.state / 2**20,
              "peak_rss_mib": measure.peak - measure.rss0, "step_ms": 1e3 * statistics.median(measure.times[WARMUP:])}
    with open(os.path.join(out, f"{tag}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
    # Lightning leaves the gloo group to interpreter shutdown, where its threads occasionally abort a rank
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _torchrun(strategy: str, method: str, out: str, tag: str, env: dict[str, str]) -> list[dict]:
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                    "benchmarks.sharded", "--rank-of", strategy, "--method", method, "--out", out, "--tag", tag],
                   check=True, env=env)
    return [json.load(open(os.path.join(out, f"{tag}-rank{r}.json"))) for r in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-of", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)  # set by the driver
    parser.add_argument("--method", choices=["dwf", "dense"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=os.path.join("benchmarks", "results", "sharded.md"))
    args = parser.parse_args()
    if args.rank_of:
        run_rank(args.rank_of, args.method, args.out, args.tag)
        return
    out = tempfile.mkdtemp(prefix="dwf-sharded-")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    # memory pass: glibc returns freed blocks of 64 KiB and more, so the resident memory follows the live tensors (the
    # mmap/munmap churn slows steps, so the times come from a second pass with the default allocator)
    memory_env = {**env, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    cells = [(s, m) for m in ("dwf", "dense") for s in ("ddp", "fsdp2")]
    memory = {c: _torchrun(*c, out, f"mem-{c[0]}-{c[1]}", memory_env) for c in cells}
    timing = {c: _torchrun(*c, out, f"time-{c[0]}-{c[1]}", env) for c in cells}
    lines = [
        f"MLP {LAYERS}×{WIDTH}² + a 10-way head ({sum(WIDTH * WIDTH for _ in range(LAYERS)) / 1e6:.1f} M weights), "
        f"AdamW, batch {BATCH} per rank, {STEPS} steps (times: median after {WARMUP}), 2 CPU processes (gloo), "
        f"torch {torch.__version__}; DWF: D={DEPTH}, λ={LAM:g}. Command: `python -m benchmarks.sharded`.",
        "",
        "| strategy | method | training state per rank (MiB) | peak RSS in training, rank 0 / 1 (MiB) "
        "| median step (ms) |",
        "|---|---|---|---|---|",
    ]
    for c in cells:
        (m0, m1), (t0, t1) = memory[c], timing[c]
        lines.append(f"| {c[0]} | {c[1]} | {m0['state_mib']:.1f} | {m0['peak_rss_mib']:.0f} / {m1['peak_rss_mib']:.0f} "
                     f"| {(t0['step_ms'] + t1['step_ms']) / 2:.0f} |")
    mean = lambda d, c, k: statistics.mean(r[k] for r in d[c])  # noqa: E731
    fsdp, ddp = ("fsdp2", "dwf"), ("ddp", "dwf")
    state = mean(memory, fsdp, "state_mib") / mean(memory, ddp, "state_mib")
    lines += ["", f"DWF, FSDP2 / DDP: training state {state:.2f}×, "
              f"peak RSS in training {mean(memory, fsdp, 'peak_rss_mib') / mean(memory, ddp, 'peak_rss_mib'):.2f}×, "
              f"step time {mean(timing, fsdp, 'step_ms') / mean(timing, ddp, 'step_ms'):.2f}× (dense: "
              f"{mean(timing, ('fsdp2', 'dense'), 'step_ms') / mean(timing, ('ddp', 'dense'), 'step_ms'):.2f}×)."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("# DWF under FSDP2 against DDP\n\n" + text)


if __name__ == "__main__":
    main()
