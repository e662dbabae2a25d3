"""Memory per rank and step time of DWF under FSDP2 (ModelParallelStrategy + ``fully_shard``) against DDP, 2 CPU
processes (gloo), the same model, D, optimizer and data.

    python -m benchmarks.sharded            # both strategies, one torchrun each; writes benchmarks/results/sharded.md

Per rank it measures (a Lightning callback inside ``Trainer.fit`` with ``DWFCallback(depth=D, lam=...)``):

* **training state**: the bytes this rank holds of parameters (factors: local shards under FSDP2), gradients and
  optimizer state, counted after a step;
* **peak RSS growth**: the process's peak resident memory (``ru_maxrss``) at the end of fit minus its resident memory
  at ``setup`` (everything fit allocates: state, activations, all-gathered layers, communication buffers);
* **step time**: the median wall time from batch start to batch end over the steps after the first ``WARMUP``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

WIDTH, LAYERS, DEPTH, BATCH, STEPS, WARMUP = 1024, 4, 3, 64, 40, 10


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _local_bytes(t: torch.Tensor) -> int:
    from lightning_dwf.core.sharding import local_tensor

    t = local_tensor(t)
    return t.numel() * t.element_size()


def run_rank(strategy: str, out: str) -> None:
    """One rank of one strategy (under torchrun)."""
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
        def setup(self, trainer, pl_module, stage):
            self.rss0, self.times, self.state = _rss_mib(), [], 0

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
        callbacks=[DWFCallback(depth=DEPTH, lam=1.0, factor_lr=FactorLRConfig(check="off"), log_pictures=False),
                   measure],
    )
    trainer.fit(MLP())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {"strategy": strategy, "rank": trainer.global_rank, "state_mib": measure.state / 2**20,
              "peak_rss_growth_mib": peak - measure.rss0, "step_ms": 1e3 * statistics.median(measure.times[WARMUP:])}
    with open(os.path.join(out, f"{strategy}-rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank-of", choices=["ddp", "fsdp2"], help=argparse.SUPPRESS)  # set by the driver
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--results", default=os.path.join("benchmarks", "results", "sharded.md"))
    args = parser.parse_args()
    if args.rank_of:
        run_rank(args.rank_of, args.out)
        return
    out = tempfile.mkdtemp(prefix="dwf-sharded-")
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
    rows = []
    for strategy in ("ddp", "fsdp2"):
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                        "benchmarks.sharded", "--rank-of", strategy, "--out", out], check=True, env=env)
        rows += [json.load(open(os.path.join(out, f"{strategy}-rank{r}.json"))) for r in (0, 1)]
    by = {s: [r for r in rows if r["strategy"] == s] for s in ("ddp", "fsdp2")}
    lines = [
        f"MLP {LAYERS}×{WIDTH}² + head, DWF D={DEPTH}, AdamW, batch {BATCH} per rank, {STEPS} steps, 2 CPU processes "
        f"(gloo), torch {torch.__version__}; `python -m benchmarks.sharded`.",
        "",
        "| strategy | rank | training state (MiB) | peak RSS growth (MiB) | median step (ms) |",
        "|---|---|---|---|---|",
        *[f"| {r['strategy']} | {r['rank']} | {r['state_mib']:.1f} | {r['peak_rss_growth_mib']:.1f} | "
          f"{r['step_ms']:.1f} |" for r in rows],
        "",
    ]
    mean = lambda s, k: statistics.mean(r[k] for r in by[s])  # noqa: E731
    lines.append(f"FSDP2 / DDP: training state {mean('fsdp2', 'state_mib') / mean('ddp', 'state_mib'):.2f}×, "
                 f"peak RSS growth {mean('fsdp2', 'peak_rss_growth_mib') / mean('ddp', 'peak_rss_growth_mib'):.2f}×, "
                 f"step time {mean('fsdp2', 'step_ms') / mean('ddp', 'step_ms'):.2f}×.")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.results), exist_ok=True)
    with open(args.results, "w") as f:
        f.write("# DWF under FSDP2 against DDP\n\n" + text)


if __name__ == "__main__":
    main()
