"""Cost of DWF against dense training, measured in one process with the configurations interleaved.

    python -m benchmarks.overhead            # writes benchmarks/results/overhead.{json,md}

* training step time (forward, backward, DWF penalty, SGD step) of DWF D = 2/3/4 vs dense, per model;
* training memory of one step: parameters, gradients, optimizer state and saved activations (counted);
* inference time of the collapsed DWF model vs the dense one (same architecture: should be 1.00).

Step times are medians over interleaved rounds, so slow drift of the machine hits every configuration alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.models import MODELS
from lightning_dwf import FactorPenalty, collapse_, factor_parameters, factorize_

RESULTS = Path(__file__).parent / "results"
CONFIGS = ("dense", "dwf-d2", "dwf-d3", "dwf-d4")


def build(model: str, config: str) -> tuple[nn.Module, torch.optim.Optimizer, FactorPenalty | None]:
    torch.manual_seed(0)
    net = MODELS[model]()
    penalty = None
    if config != "dense":
        depth = int(config[-1])
        factorize_(net, depth)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    if config != "dense":
        penalty = FactorPenalty(factor_parameters(net), 1e-3, depth)
        penalty.bind([opt])
    return net, opt, penalty


def train_steps(net, opt, penalty, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(net(x), y).backward()
        if penalty is not None:
            penalty.before_step(opt)
        opt.step()
    return (time.perf_counter() - start) / steps


def data(batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch_size, 1, 28, 28, generator=g), torch.randint(0, 10, (batch_size,), generator=g)


def step_times(model: str, batch_size: int, rounds: int, steps: int) -> dict[str, float]:
    x, y = data(batch_size)
    built = {c: build(model, c) for c in CONFIGS}
    for c in CONFIGS:  # warm-up
        train_steps(*built[c], x, y, 3)
    samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for c in CONFIGS:
            samples[c].append(train_steps(*built[c], x, y, steps))
    return {c: statistics.median(v) for c, v in samples.items()}


@torch.no_grad()
def inference_times(model: str, batch_size: int, rounds: int, steps: int) -> dict[str, float]:
    x, _ = data(batch_size)
    dense = MODELS[model]().eval()
    dwf = copy.deepcopy(dense)
    factorize_(dwf, 3)
    collapse_(dwf)
    nets = {"dense": dense, "dwf-collapsed": dwf.eval()}
    samples: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(rounds):
        for k, net in nets.items():
            start = time.perf_counter()
            for _ in range(steps):
                net(x)
            samples[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def training_memory_mb(model: str, config: str, batch_size: int) -> float:
    """Bytes a training step keeps alive, in MB: parameters, gradients, optimizer state and the activations saved
    for backward (counted through autograd's saved-tensor hooks, each storage once). CPU has no allocator statistics,
    and the process's resident-set peak is dominated by the libraries, so this is counted, not sampled."""
    x, y = data(batch_size)
    net, opt, penalty = build(model, config)
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved += t.untyped_storage().nbytes()
        return t

    params = list(net.parameters())
    seen.update(p.untyped_storage().data_ptr() for p in params)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(net(x), y)
    loss.backward()
    if penalty is not None:
        penalty.before_step(opt)
    opt.step()
    state = sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    persistent = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params) + state
    return (persistent + saved) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = []
    for model in MODELS:
        steps = step_times(model, args.batch_size, args.rounds, args.steps)
        infer = inference_times(model, args.batch_size, args.rounds, args.steps)
        mem = {c: training_memory_mb(model, c, args.batch_size) for c in CONFIGS}
        row = dict(model=model, batch_size=args.batch_size, step_seconds=steps, step_ratio={c: steps[c] / steps["dense"] for c in CONFIGS},
                   training_memory_mb=mem, memory_ratio={c: mem[c] / mem["dense"] for c in CONFIGS}, inference_seconds=infer,
                   inference_ratio=infer["dwf-collapsed"] / infer["dense"], torch=torch.__version__, threads=torch.get_num_threads())
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(rows, indent=2))
    lines = ["# DWF overhead (CPU)", "", f"Reproduce: `python -m benchmarks.overhead` (batch {args.batch_size}, {args.rounds} interleaved rounds "
             f"of {args.steps} steps, torch {torch.__version__}, {torch.get_num_threads()} threads).", "",
             "| model | dense step (ms) | step ratio D=2 | D=3 | D=4 | training memory dense (MB) | memory ratio D=2 | D=3 | D=4 | "
             "inference ratio collapsed/dense |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {1000 * r['step_seconds']['dense']:.2f} | " + " | ".join(f"{r['step_ratio'][c]:.2f}" for c in CONFIGS[1:])
                     + f" | {r['training_memory_mb']['dense']:.1f} | " + " | ".join(f"{r['memory_ratio'][c]:.2f}" for c in CONFIGS[1:])
                     + f" | {r['inference_ratio']:.2f} |")
    (RESULTS / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
