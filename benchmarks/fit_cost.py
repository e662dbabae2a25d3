"""Train time of DWF against dense, side by side in one process: what a user pays for the callback.

    python -m benchmarks.fit_cost                                     # results/fit_cost.{jsonl,md}
    python -m benchmarks.fit_cost --models lenet300 --batches 256 --rounds 3

For each model, optimizer and batch size, whole ``Trainer.fit`` calls (the structured speed benchmark's Trainer, data
order and epochs) of

* ``dense``: the plain model;
* ``dwf``: the defaults, ``DWFCallback(depth=3, target_sparsity=0.9)`` (target mode, every Linear/Conv weight);
* ``dwf-structured``: ``DWFCallback(depth=3, regime=BudgetConfig(0.25), factorize=structure(model))`` (the structured
  speed benchmark's layers by outputs, the ViT's attention by heads),

alternated ``rounds`` times on the same data so that drift of the machine hits all alike; each row is the median. The
fit includes everything the callback does (factorization, penalty, factor LR, the controller and the cut at every
control step, metrics, the collapse); no logger, so no pictures.
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from benchmarks.harness.store import RESULTS, append_rows, read_rows, versions
from benchmarks.structured_speed import MODELS, fit, structure
from examples.data import load_dataset
from lightning_dwf import BudgetConfig, CollapseConfig, DWFCallback

OUT = RESULTS / "fit_cost.jsonl"
METHODS = ("dense", "dwf", "dwf-structured")


def callbacks(method: str, model: str, example: torch.Tensor) -> list:
    """The callbacks of one method (fresh for every fit)."""
    collapse = CollapseConfig(save=False)
    if method == "dense":
        return []
    if method == "dwf":
        return [DWFCallback(depth=3, target_sparsity=0.9, collapse=collapse)]
    return [DWFCallback(depth=3, regime=BudgetConfig(0.25, example_inputs=example), factorize=structure(model),
                        collapse=collapse)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--opts", nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--batches", nargs="+", type=int, default=[256])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the rows")
    args = parser.parse_args()
    if not args.report:
        torch.set_num_threads(args.threads)
        data = load_dataset("auto")
        methods = ["dense", *(m for m in args.methods if m != "dense")]
        for batch in args.batches:
            for model in args.models:
                for opt in args.opts:
                    cfg = dict(model=model, opt=opt, epochs=args.epochs, seed=0, batch=batch)
                    times: dict[str, list[float]] = {m: [] for m in methods}
                    for _ in range(args.rounds):
                        for method in methods:
                            times[method].append(fit(cfg, data, callbacks(method, model, data.test_x[:2]))[1])
                    row = dict(cfg, rounds=args.rounds, threads=torch.get_num_threads(), dataset=data.name,
                               machine=platform.processor() or platform.machine(),
                               versions=versions(["torch", "lightning"]),
                               seconds={m: statistics.median(t) for m, t in times.items()})
                    append_rows(OUT, [row])
                    print(row, flush=True)
    write_report()


def write_report() -> None:
    rows = read_rows(OUT) if OUT.exists() else []
    if not rows:
        return
    latest = {(r["model"], r["opt"], r["batch"]): r for r in rows}  # a re-run replaces its cell
    first = rows[0]
    lines = [f"Whole-fit train time, {first['epochs']} epochs of {first['dataset']}, median of {first['rounds']} "
             f"alternated rounds, {first['threads']} threads, {first['machine']}, torch "
             f"{first['versions'].get('torch')} (`python -m benchmarks.fit_cost`). DWF: the defaults, "
             "`target_sparsity=0.9`; structured: `BudgetConfig(0.25)`.", "",
             "| model | optimizer | batch | dense s | DWF s | DWF / dense | structured DWF s | structured / dense |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, opt, batch), r in sorted(latest.items(), key=lambda kv: (kv[0][2], MODELS.index(kv[0][0]), kv[0][1])):
        s = r["seconds"]
        cells = []
        for method in ("dwf", "dwf-structured"):
            cells += [f"{s[method]:.1f}", f"{s[method] / s['dense']:.2f}×"] if method in s else ["—", "—"]
        lines.append(f"| {model} | {opt} | {batch} | {s['dense']:.1f} | " + " | ".join(cells) + " |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
