"""One training run with any DWF setting, for the questions the sweep's fixed recipe cannot answer.

The README's section "Why DWF trailed ModelPruning" cites these runs (factor learning rate, recovery
fraction, controller ablation, seed spread). Each call appends one row (config + results, the sweep's
schema) to ``benchmarks/results/probes.jsonl``; ``--table`` prints every probe grouped over seeds.

    python -m benchmarks.probe --target 0.98 --factor-lr-multiplier 10 --recovery 0.5 --seed 1
    python -m benchmarks.probe --target 0.98 --model-pruning --seed 1
    python -m benchmarks.probe --model cnn-bn --dense --seed 1
    python -m benchmarks.probe --target 0.98 --controller-gain 0     # ablation: λ never leaves its warm-up value
    python -m benchmarks.probe --target 0.98 --defaults --seed 1     # the callback's defaults, no recipe
    python -m benchmarks.probe --table
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from benchmarks import sweep
from benchmarks.harness.fit import DEVICE_DEFAULTS, LR, MOMENTUM
from benchmarks.harness.methods import method_callbacks
from benchmarks.harness.runs import train_and_measure
from benchmarks.harness.store import RESULTS, append_rows, make_row, read_rows
from benchmarks.harness.tables import by_config
from examples.data import load_dataset
from lightning_dwf import ScheduleConfig

PATH = RESULTS / "probes.jsonl"
#: Config keys the table shows under "other" when a row has them.
OTHER_KEYS = (
    *DEVICE_DEFAULTS,
    "init",
    "controller_gain",
    "controller_max_step",
    "control_threshold",
    "recovery_lr_warmup",
    "recipe",
)


def config(args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or sweep.MODES["full"]["epochs"][args.dataset][args.model]
    cfg: dict[str, Any] = dict(
        dataset=args.dataset,
        model=args.model,
        epochs=epochs,
        batch_size=sweep.BATCH_SIZE[args.dataset],
        lr=LR,
        momentum=MOMENTUM,
        seed=args.seed,
    )
    cfg.update({k: getattr(args, k) for k, default in DEVICE_DEFAULTS.items() if getattr(args, k) != default})
    if args.dense:
        return dict(cfg, method="dense")
    if args.model_pruning:
        return dict(cfg, method="model-pruning", target=args.target)
    cfg["depth"] = args.depth
    if args.init != "dwf":
        cfg["init"] = args.init
    if args.defaults:
        return dict(cfg, method=f"dwf-target-d{args.depth}", target=args.target, recipe="defaults")
    cfg.update(factor_lr_multiplier=args.factor_lr_multiplier, factor_lr_warmup=args.factor_lr_warmup)
    if args.lam is not None:
        return dict(cfg, method=f"dwf-d{args.depth}", lam=args.lam)
    cfg.update(method=f"dwf-target-d{args.depth}", target=args.target, recovery=args.recovery)
    cfg["control_threshold"] = "auto" if args.control_threshold is None else args.control_threshold
    cfg.update(sweep.TARGET_RECIPE)
    for name in ("controller_gain", "controller_max_step"):
        if getattr(args, name) is not None:
            cfg[name] = getattr(args, name)
    return cfg


def run(cfg: dict[str, Any], data_dir: str | None = None) -> dict[str, Any]:
    tuned = {name: cfg[f"controller_{name}"] for name in ("gain", "max_step") if f"controller_{name}" in cfg}
    callbacks = method_callbacks(cfg, ScheduleConfig(**tuned))
    return train_and_measure(cfg, load_dataset(cfg["dataset"], data_dir), callbacks)


def table() -> str:
    rows_all = read_rows(PATH)
    out = [
        "| method | target / λ | factor lr × (warm-up) | recovery | other | accuracy % per seed | mean | CR |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rows in by_config(rows_all):
        c = rows[0]["config"]
        accs = [r["results"]["acc"] for r in sorted(rows, key=lambda r: r["config"]["seed"])]
        ok = [a for a in accs if a is not None]
        mean = f"{100 * sum(ok) / len(ok):.2f}" if len(ok) == len(accs) else "diverged"
        default_epochs = sweep.MODES["full"]["epochs"][c["dataset"]][c["model"]]
        other = ", ".join(
            [c["model"]] * (c["model"] != "lenet300")
            + [f"{c['epochs']} epochs"] * (c["epochs"] != default_epochs)
            + [f"{k}={c[k]}" for k in OTHER_KEYS if k in c]
        )
        crs = [r["results"]["compression_ratio"] for r in rows if r["results"]["acc"] is not None]
        cr = f"{sum(crs) / len(crs):.1f}" if crs else "—"
        per_seed = " / ".join("NaN" if a is None else f"{100 * a:.2f}" for a in accs)
        out.append(
            f"| {c['method']} | {c.get('target', c.get('lam'))} | {c.get('factor_lr_multiplier', '')} "
            f"({c.get('factor_lr_warmup', '')}) | "
            f"{c.get('recovery', '')} | {other} | {per_seed} | {mean} | {cr} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="lenet300", choices=("lenet300", "lenet5", "cnn-bn"))
    parser.add_argument("--epochs", type=int, default=None, help="default: the full sweep's epochs for this setting")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--target", type=float, default=0.98, help="target sparsity (DWF target mode and ModelPruning)")
    parser.add_argument("--lam", type=float, default=None, help="a fixed λ instead of the target")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="DWFCallback(depth=D, target_sparsity=T) and nothing else (ignores the factor-LR, recovery and "
        "controller options)",
    )
    parser.add_argument("--factor-lr-multiplier", type=float, default=10.0)
    parser.add_argument("--factor-lr-warmup", type=float, default=0.0)
    parser.add_argument("--recovery", type=float, default=0.5)
    parser.add_argument(
        "--init",
        default="dwf",
        choices=("dwf", "balanced"),
        help="factor init (balanced: exact factorization of the dense init)",
    )
    parser.add_argument(
        "--controller-gain",
        type=float,
        default=None,
        help="override the λ controller's gain (0: λ stays at its start value)",
    )
    parser.add_argument(
        "--controller-max-step", type=float, default=None, help="override the bound on |Δ ln λ| per update"
    )
    parser.add_argument(
        "--control-threshold",
        type=float,
        default=None,
        help="ScheduleConfig(control_threshold=...) (default: the callback's)",
    )
    parser.add_argument(
        "--accelerator", default=DEVICE_DEFAULTS["accelerator"], help="Trainer(accelerator=...), e.g. gpu"
    )
    parser.add_argument(
        "--precision", default=DEVICE_DEFAULTS["precision"], help="Trainer(precision=...), e.g. 16-mixed on a GPU"
    )
    parser.add_argument(
        "--data-dir", default=None, help="where the dataset files are (default: the loader's search path)"
    )
    parser.add_argument(
        "--model-pruning", action="store_true", help="Lightning's ModelPruning (gradual global L1) instead of DWF"
    )
    parser.add_argument("--dense", action="store_true", help="plain training (the seed spread of the dense baseline)")
    parser.add_argument("--table", action="store_true", help="print the probes recorded so far and exit")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = config(args)
    results = run(cfg, args.data_dir)
    row = make_row(cfg, results, sweep.VERSIONED)
    PATH.parent.mkdir(parents=True, exist_ok=True)
    append_rows(PATH, [row])
    print(json.dumps(row))


if __name__ == "__main__":
    main()
