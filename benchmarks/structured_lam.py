"""Fixed λ in structured mode: ``DWFCallback(depth=3, lam=λ, factorize=...)``, no budget, on the structured speed
benchmark's models and training setting (:mod:`benchmarks.structured_speed`: 3 epochs, batch 256, SGD lr 0.1 or
AdamW lr 1e-3, the same scope of gated layers), collapsed and shrunk. It is the table from λ to the shrunk model's
MACs that a user who names λ instead of a budget needs, to set beside ``BudgetConfig``'s rows.

    python -m benchmarks.structured_lam                                   # the default grid, every model and optimizer
    python -m benchmarks.structured_lam --models lenet300 --opts sgd --lam 3e-3 1e-2 2e-2
    python -m benchmarks.structured_lam --recovery 0 --lam ...            # a constant λ (FixedLamConfig(recovery=0))
    python -m benchmarks.structured_lam --report                          # structured_lam.md from the rows

One row per run goes to ``benchmarks/results/structured_lam.jsonl`` (a config already there is skipped); a run DWF
refuses (e.g. a λ at which the penalty step alone would overshoot) or that ends on non-finite weights is an error row.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from benchmarks.harness.measure import measure as measure_net
from benchmarks.harness.store import RESULTS, append_rows, read_rows, versions
from benchmarks.harness.tables import parse_recovery, recovery_text, row_recovery
from benchmarks.structured_speed import OPTS, cost, fit, new_module, structure
from examples.data import ImageData, load_dataset
from lightning_dwf import CollapseConfig, DWFCallback, FixedLamConfig, shrink_
from lightning_dwf.config import DEFAULT_LAM_RECOVERY

OUT = RESULTS / "structured_lam.jsonl"
MODELS = ("lenet300", "cnn-bn", "vit")
#: The default λ grid per optimizer (mean-loss units) for the default ramp; under Adam-type optimizers λ is a shrink per
#: unit LR, so the two scales differ (docs, "Optimizers"). The constant λ's rows (``--recovery 0``) used
#: 3e-3 … 5e-2 and 0.03 … 1.
LAMS = {"sgd": (5e-3, 1e-2, 2e-2, 5e-2, 1e-1, 2e-1), "adamw": (0.1, 0.3, 0.5, 1.0, 2.0)}


def run_cell(cfg: dict[str, Any], data: ImageData) -> dict[str, Any]:
    """Train ``cfg`` (``model``, ``opt``, ``lam``, ``epochs``, ``seed``, optionally ``recovery`` for
    ``FixedLamConfig(lam, recovery=...)``; absent: a constant λ) with a fixed λ, collapse and shrink it; its row: test
    accuracy, the shrunk model's MACs and parameters beside dense's, train seconds, the shrink's output check."""
    x = data.test_x[:2]
    dense = cost(new_module(cfg, data).net, x)
    regime = FixedLamConfig(cfg["lam"], recovery=row_recovery(cfg))
    dwf = DWFCallback(depth=3, regime=regime, factorize=structure(cfg["model"]),
                      collapse=CollapseConfig(save=False), verbose=False)
    try:
        module, seconds = fit(cfg, data, [dwf])
    except (ValueError, MisconfigurationException) as err:
        return dict(cfg, error=str(err))
    net = module.net.eval()
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        return dict(cfg, error="diverged: non-finite weights after training")
    acc = measure_net(net, data)["acc"]
    report = shrink_(net, x)
    return dict(cfg, acc=acc, train_s=seconds, **cost(net, x), dense_macs=dense["macs"], dense_params=dense["params"],
                shrink_max_abs_diff=report.max_abs_diff)


def key(row: dict[str, Any]) -> str:
    """A run's identity (rows without ``recovery`` ran a constant λ)."""
    return json.dumps({k: row[k] for k in ("model", "opt", "lam", "epochs", "seed")}
                      | {"recovery": row_recovery(row)}, sort_keys=True)


def write_report(out: Path = OUT) -> str:
    """``<out>.md``: one line per model, optimizer and λ (seed 0), in λ order; returns the table."""
    rows = sorted((r for r in read_rows(out) if r["seed"] == 0),
                  key=lambda r: (MODELS.index(r["model"]) if r["model"] in MODELS else 99, r["opt"],
                                 row_recovery(r), r["lam"]))
    lines = ["| model | optimizer | recovery | λ | MACs / dense | parameters / dense | test accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['opt']} | {recovery_text(r)} | {r['lam']:g} |"
        if "error" in r:
            lines.append(f"{head} {r['error'][:60]} | | |")
            continue
        lines.append(f"{head} {r['macs'] / r['dense_macs']:.3f} | {r['params'] / r['dense_params']:.3f} | "
                     f"{r['acc']:.2%} |")
    table = "\n".join(lines)
    out.with_suffix(".md").write_text(
        "# Fixed λ in structured mode\n\n`python -m benchmarks.structured_lam [--recovery R]` (seed 0, 3 epochs, batch "
        "256; MACs and parameters of the shrunk model; recovery 0: λ constant for the whole run, R > 0: λ ramped over "
        "the first 1 − R of the run, then the pattern fixed and λ = 0).\n\n" + table + "\n")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--opts", nargs="+", default=list(OPTS))
    parser.add_argument("--lam", type=float, nargs="+", default=None, help="λ values (default: LAMS per optimizer)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recovery", type=parse_recovery, default=DEFAULT_LAM_RECOVERY,
                        help="FixedLamConfig(recovery=...): 0 a constant λ, R > 0 λ ramped and released for the last R "
                             "of the run ('default', the default: the library's default, stored as its value)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--report", action="store_true", help="only rewrite the table from the rows")
    args = parser.parse_args(argv)
    if not args.report:
        torch.set_num_threads(args.threads)
        data = load_dataset("auto")
        done = {key(r) for r in read_rows(args.out)} if args.out.exists() else set()
        for model in args.models:
            for opt in args.opts:
                for lam in args.lam or LAMS[opt]:
                    cfg = dict(model=model, opt=opt, lam=lam, epochs=args.epochs, seed=args.seed)
                    if args.recovery:
                        cfg["recovery"] = args.recovery
                    if key(cfg) in done:
                        continue
                    row = run_cell(cfg, data) | dict(threads=torch.get_num_threads(), dataset=data.name,
                                                     versions=versions(["torch", "lightning", "torch-pruning"]))
                    append_rows(args.out, [row])
                    print(json.dumps({k: v for k, v in row.items() if not isinstance(v, dict)}), flush=True)
    print(write_report(args.out))


if __name__ == "__main__":
    main()
