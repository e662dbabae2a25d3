"""Cost of DWF against dense training, measured in one process with the configurations interleaved.

    python -m benchmarks.overhead                    # CPU, the MNIST-sized nets: benchmarks/results/overhead.{json,md}
    python -m benchmarks.overhead --device cuda      # GPU, also VGG-11 and ResNet-18 on CIFAR-shaped synthetic data
                                                     # (fp32 and bf16 autocast):
                                                     # benchmarks/results/overhead_cuda.{json,md}

* training step time (forward, backward, DWF penalty, SGD step) of DWF D = 2/3/4 vs dense, per model;
* training memory of one step: parameters, gradients, optimizer state and saved activations (counted, on
  every device);
* inference time of the collapsed DWF model vs the dense one (same architecture: should be 1.00).

Step times are medians over interleaved rounds, so slow drift of the machine hits every configuration alike.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
from torch import nn

from benchmarks.harness.store import RESULTS
from benchmarks.models import ALL_MODELS, INPUT_SHAPES, MODELS
from lightning_dwf import FactorPenalty, collapse_, factor_parameters, factorize_

CONFIGS = ("dense", "dwf-d2", "dwf-d3", "dwf-d4")


def build(
    model: str, config: str, device: str = "cpu"
) -> tuple[nn.Module, torch.optim.Optimizer, FactorPenalty | None]:
    torch.manual_seed(0)
    net = ALL_MODELS[model]().to(device)
    penalty = None
    if config != "dense":
        depth = int(config[-1])
        factorize_(net, depth)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    if config != "dense":
        penalty = FactorPenalty(factor_parameters(net), 1e-3, depth)
        penalty.bind([opt])
    return net, opt, penalty


def _is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def _sync(device: str) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def loss_of(net: nn.Module, x: torch.Tensor, y: torch.Tensor, amp: bool) -> torch.Tensor:
    """The training loss, with the forward in bf16 autocast if ``amp`` (factors and the penalty stay float32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        return nn.functional.cross_entropy(net(x), y)


def train_steps(net, opt, penalty, x, y, steps: int, amp: bool = False) -> float:
    """Seconds per training step."""
    _sync(x.device.type)
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_of(net, x, y, amp).backward()
        if penalty is not None:
            penalty.before_step(opt)
        opt.step()
    _sync(x.device.type)
    return (time.perf_counter() - start) / steps


def data(model: str, batch_size: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch_size, *INPUT_SHAPES[model], generator=g), torch.randint(0, 10, (batch_size,), generator=g)
    return x.to(device), y.to(device)


def step_times(
    model: str, batch_size: int, rounds: int, steps: int, device: str = "cpu", amp: bool = False
) -> dict[str, float]:
    x, y = data(model, batch_size, device)
    built = {c: build(model, c, device) for c in CONFIGS}
    for c in CONFIGS:  # warm-up
        train_steps(*built[c], x, y, 3, amp)
    samples: dict[str, list[float]] = {c: [] for c in CONFIGS}
    for _ in range(rounds):
        for c in CONFIGS:
            samples[c].append(train_steps(*built[c], x, y, steps, amp))
    return {c: statistics.median(v) for c, v in samples.items()}


@torch.no_grad()
def inference_times(model: str, batch_size: int, rounds: int, steps: int, device: str = "cpu") -> dict[str, float]:
    x, _ = data(model, batch_size, device)
    dense = ALL_MODELS[model]().to(device).eval()
    dwf = copy.deepcopy(dense)
    factorize_(dwf, 3)
    collapse_(dwf)
    nets = {"dense": dense, "dwf-collapsed": dwf.eval()}
    for net in nets.values():  # warm-up (cuDNN autotuning, lazy init)
        net(x)
    samples: dict[str, list[float]] = {k: [] for k in nets}
    for _ in range(rounds):
        for k, net in nets.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                net(x)
            _sync(device)
            samples[k].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in samples.items()}


def training_memory_mb(model: str, config: str, batch_size: int, device: str = "cpu", amp: bool = False) -> float:
    """Bytes a training step keeps alive, in MB: parameters, gradients, optimizer state and the activations saved
    for backward (counted through autograd's saved-tensor hooks, each storage once). Counted, not sampled, on every
    device: CPU has no allocator statistics, and a GPU allocator's peak moves with the convolution workspaces cuDNN
    picks per run (on the H200 it put VGG-11 with D=3 at 0.63× dense)."""
    x, y = data(model, batch_size, device)
    net, opt, penalty = build(model, config, device)
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
        loss = loss_of(net, x, y, amp)
    loss.backward()
    if penalty is not None:
        penalty.before_step(opt)
    opt.step()
    state = sum(v.nbytes for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    persistent = sum(p.nbytes + (p.grad.nbytes if p.grad is not None else 0) for p in params) + state
    return (persistent + saved) / 2**20


def measure_model(model: str, args: argparse.Namespace, amp: bool) -> dict:
    device = args.device
    steps = step_times(model, args.batch_size, args.rounds, args.steps, device, amp)
    infer = inference_times(model, args.batch_size, args.rounds, args.steps, device)
    mem = {c: training_memory_mb(model, c, args.batch_size, device, amp) for c in CONFIGS}
    return dict(
        model=model,
        batch_size=args.batch_size,
        device=device,
        amp="bf16" if amp else None,
        device_name=torch.cuda.get_device_name(device) if _is_cuda(device) else "cpu",
        step_seconds=steps,
        step_ratio={c: steps[c] / steps["dense"] for c in CONFIGS},
        training_memory_mb=mem,
        memory_ratio={c: mem[c] / mem["dense"] for c in CONFIGS},
        inference_seconds=infer,
        inference_ratio=infer["dwf-collapsed"] / infer["dense"],
        torch=torch.__version__,
        threads=torch.get_num_threads(),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda adds the CIFAR-shaped VGG-11 and ResNet-18)")
    parser.add_argument(
        "--models", nargs="*", choices=sorted(ALL_MODELS), help="default: the MNIST nets on cpu, all on cuda"
    )
    args = parser.parse_args()
    cuda = _is_cuda(args.device)
    if cuda and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here.")
    models = args.models or (list(ALL_MODELS) if cuda else list(MODELS))
    rows = []
    for model in models:
        for amp in (False, True) if cuda else (False,):
            row = measure_model(model, args, amp)
            rows.append(row)
            print(json.dumps(row), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "overhead_cuda" if cuda else "overhead"
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    where = rows[0]["device_name"] if cuda else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# DWF overhead ({'GPU' if cuda else 'CPU'})",
        "",
        f"Reproduce: `python -m benchmarks.overhead{' --device ' + args.device if cuda else ''}` (batch "
        f"{args.batch_size}, "
        f"{args.rounds} interleaved rounds of {args.steps} steps, torch {torch.__version__}, {where}; SGD momentum "
        "0.9).",
        "",
        "| model | precision | dense step (ms) | step ratio D=2 | D=3 | D=4 | training memory dense (MB) | memory "
        "ratio D=2 | "
        "D=3 | D=4 | inference ratio collapsed/dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'bf16 autocast' if r['amp'] else 'fp32'} | {1000 * r['step_seconds']['dense']:.2f} | "
            + " | ".join(f"{r['step_ratio'][c]:.2f}" for c in CONFIGS[1:])
            + f" | {r['training_memory_mb']['dense']:.1f} | "
            + " | ".join(f"{r['memory_ratio'][c]:.2f}" for c in CONFIGS[1:])
            + f" | {r['inference_ratio']:.2f} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
