"""Train time of structured DWF against dense, side by side in one process.

    python -m benchmarks.structured_cost                      # results/structured_cost.md
    python -m benchmarks.structured_cost --models lenet300 --rounds 3 --epochs 1

For each model and optimizer, whole ``Trainer.fit`` calls of the dense model and of structured DWF
(``DWFCallback(depth=3, regime=BudgetConfig(0.25), factorize=structure(model))``: the structured speed benchmark's
layers, by outputs, and the ViT's attention by heads), batch 256, alternated ``rounds`` times on the same data so
that drift of the machine hits both alike; the ratio of the medians. The fit includes everything the callback does
(factorization, penalty, factor LR, the controller and the budget cut at every control step, metrics, the collapse).
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from benchmarks.harness.store import RESULTS
from benchmarks.structured_speed import BATCH_SIZE, MODELS, fit, structure
from examples.data import load_dataset
from lightning_dwf import BudgetConfig, CollapseConfig, DWFCallback

#: The budget each model is trained to (a quarter of its MACs; the ViT loses MLP neurons and attention heads).
BUDGET: dict[str, float] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--opts", nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset("auto")
    x = data.test_x[:2]
    lines = [f"Whole-fit train time, {args.epochs} epoch(s) of {data.name} at batch {BATCH_SIZE}, median of "
             f"{args.rounds} alternated rounds, {args.threads} threads, {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__} (`python -m benchmarks.structured_cost`).", "",
             "| model | optimizer | budget | dense s | structured DWF s | ratio |", "|---|---|---|---|---|---|"]
    out = RESULTS / "structured_cost.md"
    kept = {}  # rows of models not measured now stay
    if out.exists():
        for line in out.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if line.startswith("| ") and len(cells) == 6 and cells[0] not in args.models and cells[0] != "model":
                kept[(cells[0], cells[1])] = line
    for model in args.models:
        for opt in args.opts:
            cfg = dict(model=model, opt=opt, epochs=args.epochs, seed=0)
            times: dict[str, list[float]] = {"dense": [], "dwf": []}
            for _ in range(args.rounds):
                times["dense"].append(fit(cfg, data, [])[1])
                dwf = DWFCallback(depth=3, regime=BudgetConfig(BUDGET.get(model, 0.25), example_inputs=x),
                                  factorize=structure(model),
                                  collapse=CollapseConfig(save=False))
                times["dwf"].append(fit(cfg, data, [dwf])[1])
            dense, dwf_s = statistics.median(times["dense"]), statistics.median(times["dwf"])
            lines.append(f"| {model} | {opt} | {BUDGET.get(model, 0.25):.0%} | {dense:.1f} | {dwf_s:.1f} | "
                         f"{dwf_s / dense:.2f}× |")
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines + list(kept.values())) + "\n")


if __name__ == "__main__":
    main()
