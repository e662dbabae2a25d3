"""Train time of DWF against dense, side by side in one process: what a user pays for the callback.

    python -m benchmarks.fit_cost                                     # results/fit_cost.{jsonl,md}
    python -m benchmarks.fit_cost --models lenet300 --batches 256 --rounds 3

For each model, optimizer and batch size, whole ``Trainer.fit`` calls (the structured speed benchmark's Trainer, data
order and epochs) of

* ``dense``: the plain model;
* ``dwf``: the defaults, ``DWFCallback(depth=3, target_sparsity=0.9)`` (target mode, every Linear/Conv weight);
* ``dwf-structured``: ``DWFCallback(depth=3, regime=BudgetConfig(0.25), factorize=structure(model))`` (the structured
  speed benchmark's layers by outputs, the ViT's attention by heads);
* ``dwf-qat``: the defaults with the quantization-aware finish (``quantize=QuantizeConfig(bits=8)``);
* ``dwf-dense``: the defaults with ``FactorLRConfig(fixed_pattern="dense")``: the survivors fine-tune as dense
  weights once the pattern is fixed (one tensor trained instead of D), timed beside the defaults (not a column of the
  table: the rows keep its seconds);
* ``factorized``: the model factorized by ``factorize_(depth=3)`` and no callback: what the D-fold parameters cost
  alone (the product and its backward, the optimizer over D factors), with no penalty, cut, factor LR or metrics;
* ``gated``: the same for structured DWF, ``factorize_(depth=3, config=structure(model))`` and no callback: what the
  gated layers cost alone (the gates on the outputs and their backward, the optimizer over the gates);
* ``dense-wandb`` / ``dwf-wandb``: dense and the defaults with an offline ``WandbLogger``, so the callback's metrics and
  pictures (weight histograms every 10 × the logging cadence, the density figure at fit end) are rendered and written
  (the pair compares like with like: the logger's own cost is in both),

alternated ``rounds`` times on the same data so that drift of the machine hits all alike; each row keeps every round's
seconds and their medians, and the table gives each method's ratio to its baseline as the median over the rounds of
the ratio within the round, with the smallest and largest of them (on this 2-core machine a fit's speed can change
by 10 % from one round to the next, and not alike for every method). The fit includes everything the callback does
(factorization, penalty, factor LR, the controller and the cut at every control step, metrics, the collapse).

``--fused on`` builds every optimizer, dense included, with PyTorch's fused kernel (``fused=True``); ``--fused both``
runs every method both ways within each round and writes one row per way, so the two are timed side by side. DWF
trains D times the parameters, so the optimizer's step is a larger share of its fit than of dense's.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from typing import Any

import torch

from benchmarks.harness.store import RESULTS, append_rows, read_rows, versions
from benchmarks.models import Classifier
from benchmarks.structured_speed import MODELS, fit, new_module, structure
from examples.data import ImageData, load_dataset
from lightning_dwf import BudgetConfig, CollapseConfig, DWFCallback, FactorLRConfig, QuantizeConfig, factorize_

OUT = RESULTS / "fit_cost.jsonl"
METHODS = ("dense", "dwf", "dwf-structured", "dwf-qat", "dense-wandb", "dwf-wandb", "factorized", "gated",
           "dwf-dense")
#: ``--fused``: the optimizers' fused kernel off, on, or both ways alternated within every round.
FUSED = ("off", "on", "both")


def callbacks(method: str, model: str, example: torch.Tensor) -> list:
    """The callbacks of one method (fresh for every fit)."""
    collapse = CollapseConfig(save=False)
    if method.startswith("dense") or method in ("factorized", "gated"):
        return []
    if method in ("dwf", "dwf-wandb"):
        return [DWFCallback(depth=3, target_sparsity=0.9, collapse=collapse)]
    if method == "dwf-dense":
        return [DWFCallback(depth=3, target_sparsity=0.9, collapse=collapse,
                            factor_lr=FactorLRConfig(fixed_pattern="dense"))]
    if method == "dwf-qat":
        return [DWFCallback(depth=3, target_sparsity=0.9, collapse=collapse, quantize=QuantizeConfig(bits=8))]
    return [DWFCallback(depth=3, regime=BudgetConfig(0.25, example_inputs=example), factorize=structure(model),
                        collapse=collapse)]


def module_of(method: str, cfg: dict, data: ImageData) -> Classifier | None:
    """The module to train: for ``factorized`` the model with every Linear/Conv weight factorized (depth 3), for
    ``gated`` the structured selection gated (depth 3), else None (``fit`` builds the plain one)."""
    if method not in ("factorized", "gated"):
        return None
    module = new_module(cfg, data)
    factorize_(module, depth=3, config=structure(cfg["model"]) if method == "gated" else None)
    return module


def trainer_arguments(method: str, directory: str) -> dict[str, Any]:
    """The Trainer arguments of one method: an offline W&B logger writing under ``directory`` for the ``-wandb``
    ones."""
    if not method.endswith("-wandb"):
        return {}
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    return dict(logger=WandbLogger(project="lightning-dwf-fit-cost", save_dir=directory, offline=True),
                log_every_n_steps=50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--opts", nargs="+", default=["sgd", "adamw"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS[:3]), choices=METHODS)
    parser.add_argument("--batches", nargs="+", type=int, default=[256])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fused", choices=FUSED, default="off",
                        help="the optimizers' fused kernel (fused=True) for every fit, dense included: off, on, or "
                             "both (each round runs every method both ways; one row per way)")
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the rows")
    args = parser.parse_args()
    if not args.report:
        torch.set_num_threads(args.threads)
        data = load_dataset("auto")
        methods = ["dense", *(m for m in args.methods if m != "dense")]
        ways = {"off": [False], "on": [True], "both": [False, True]}[args.fused]
        for batch in args.batches:
            for model in args.models:
                for opt in args.opts:
                    cfgs = {fused: dict(model=model, opt=opt, epochs=args.epochs, seed=0, batch=batch,
                                        **({"fused": True} if fused else {})) for fused in ways}
                    times = time_rounds(cfgs, methods, args.rounds, data)
                    for fused, cfg in cfgs.items():
                        row = dict(cfg, rounds=args.rounds, threads=torch.get_num_threads(), dataset=data.name,
                                   machine=platform.processor() or platform.machine(),
                                   versions=versions(["torch", "lightning"]),
                                   seconds={m: statistics.median(t) for m, t in times[fused].items()},
                                   round_seconds=times[fused], **({"interleaved": args.fused} if len(ways) > 1 else {}))
                        append_rows(OUT, [row])
                        print(row, flush=True)
    write_report()


def time_rounds(cfgs: dict[bool, dict], methods: list[str], rounds: int, data: ImageData) -> dict[bool, dict]:
    """Seconds of every fit: ``rounds`` times, each config of ``cfgs`` (by ``fused``) with every method in turn;
    returns ``{fused: {method: [seconds per round]}}``."""
    times: dict[bool, dict[str, list[float]]] = {fused: {m: [] for m in methods} for fused in cfgs}
    for _ in range(rounds):
        for fused, cfg in cfgs.items():
            for method in methods:
                with tempfile.TemporaryDirectory() as directory:
                    times[fused][method].append(fit(
                        cfg, data, callbacks(method, cfg["model"], data.test_x[:2]), module_of(method, cfg, data),
                        **trainer_arguments(method, directory))[1])
    return times


#: The table's columns: (method, its baseline in the same run, header).
COLUMNS = (("factorized", "dense", "factorized, no callback"), ("dwf", "dense", "DWF"),
           ("gated", "dense", "gated, no callback"), ("dwf-structured", "dense", "structured DWF"),
           ("dwf-qat", "dense", "DWF + QAT finish"),
           ("dwf-wandb", "dense-wandb", "DWF + W&B pictures"))


def ratio(row: dict, method: str, base: str) -> tuple[float, tuple[float, float] | None]:
    """``method``'s train time over ``base``'s in one row: the median over the rounds of the ratio within each round,
    with the smallest and largest (rows of single medians, from before rounds were kept: the ratio of the medians and
    no range)."""
    rounds = row.get("round_seconds")
    if not rounds or method not in rounds or base not in rounds:
        return row["seconds"][method] / row["seconds"][base], None
    return round_ratio(rounds[method], rounds[base])


def round_ratio(tops: list[float], bottoms: list[float]) -> tuple[float, tuple[float, float]]:
    """The median over alternated rounds of ``top / bottom`` within each round, with the smallest and largest (the
    machine drifts between rounds; within a round the two ran back to back)."""
    ratios = [t / b for t, b in zip(tops, bottoms, strict=True)]
    return statistics.median(ratios), (min(ratios), max(ratios))


def write_report() -> None:
    """The table: each cell is the latest run of its method, as a ratio to the baseline timed in that same run."""
    rows = read_rows(OUT) if OUT.exists() else []
    if not rows:
        return
    latest: dict[tuple, dict[str, tuple[float, tuple[float, float] | None]]] = {}
    dense: dict[tuple, float] = {}
    for r in rows:  # later rows replace earlier ones, method by method
        key = (r["model"], r["opt"] + (" (fused)" if r.get("fused") else ""), r["batch"])
        cell = latest.setdefault(key, {})
        for method, base, _ in COLUMNS:
            if method in r["seconds"] and base in r["seconds"]:
                cell[method] = ratio(r, method, base)
        if "dense" in r["seconds"]:
            dense[key] = r["seconds"]["dense"]
    first = rows[-1]
    rounds = sorted({r["rounds"] for r in rows})
    rounds_text = str(rounds[0]) if len(rounds) == 1 else f"{rounds[0]}–{rounds[-1]} (by run)"
    lines = [f"Whole-fit train time, {first['epochs']} epochs of {first['dataset']}, median of {rounds_text} "
             f"alternated rounds, {first['threads']} threads, {first['machine']}, torch "
             f"{first['versions'].get('torch')} (`python -m benchmarks.fit_cost`). DWF: the defaults, "
             "`target_sparsity=0.9`; structured: `BudgetConfig(0.25)`; QAT finish: `QuantizeConfig(bits=8)`; "
             "W&B pictures: the defaults with an offline `WandbLogger` (metrics, histograms, figure) against dense "
             "with the same logger; factorized, no callback: `factorize_(model, depth=3)` trained plainly (the D-fold "
             "parameters alone); gated, no callback: the structured selection gated by `factorize_` and trained "
             "plainly (the gates alone). Each ratio is to the baseline timed in the same run: the median over the "
             "rounds of the ratio within each round, with the smallest and largest in brackets (rows from before the "
             "rounds were kept: the ratio of the medians).", "",
             "| model | optimizer | batch | dense s | " + " | ".join(f"{h} / dense" for *_, h in COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(COLUMNS)]
    for key, cell in sorted(latest.items(), key=lambda kv: (kv[0][2], MODELS.index(kv[0][0]), kv[0][1])):
        model, opt, batch = key
        ratios = [_cell(*cell[m]) if m in cell else "—" for m, *_ in COLUMNS]
        seconds = f"{dense[key]:.1f}" if key in dense else "—"
        lines.append(f"| {model} | {opt} | {batch} | {seconds} | " + " | ".join(ratios) + " |")
    OUT.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _cell(value: float, spread: tuple[float, float] | None) -> str:
    """A table cell: the ratio, and the range of the rounds' ratios where the row kept them."""
    return f"{value:.2f}×" + (f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread else "")


if __name__ == "__main__":
    main()
