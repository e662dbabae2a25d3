"""Fixed λ on matrix cells: ``DWFCallback(depth=3, lam=λ)`` and nothing else, in the matrix's training setting (same
optimizer, LR schedule, epochs, data order): how many exact zeros each λ gives, and at what accuracy.

    python -m benchmarks.fixed_lam                                   # LeNet-300-100, Fashion-MNIST, AdamW, batch 64
    python -m benchmarks.fixed_lam --opt sgd --lam 3e-4 1e-3 3e-3
    python -m benchmarks.fixed_lam --opt sgd --bs 256 --lr 0.2 --peers --lam 1e-3 3e-3     # another LR, with peers

Under Adam-type optimizers λ is a shrink per unit LR (about 1e2-1e3 × SGD's λ) and each step is followed by the
proximal step of ``λ·|w|^(2/D)`` (docs, "Optimizers"). One row per run goes to ``benchmarks/results/fixed_lam.jsonl``
(runs already there are skipped); the table of every row is printed.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from benchmarks import matrix
from benchmarks.harness.runs import run_plan
from benchmarks.harness.store import RESULTS
from benchmarks.harness.tables import parse_recovery, recovery_text, row_recovery

PATH = RESULTS / "fixed_lam.jsonl"
DEFAULT_LAMS = (0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.3, 0.5)
PEER_TARGETS = (0.9, 0.98, 0.995)


def plan(dataset: str, model: str, opt: str, batch_size: int, lams: list[float], seed: int = 0,
         recovery: float = 0.0, relative: bool = False, lr: float | None = None) -> list[dict[str, Any]]:
    """One ``dwf-lam`` config per λ on the matrix cell ``(dataset, model, opt, batch_size)``: ``FixedLamConfig(lam,
    recovery=..., relative=...)`` (``recovery`` 0: constant λ); ``lr``: the optimizer's peak LR instead of the
    matrix's."""
    base = dict(matrix.base_config(dataset, model, opt, batch_size), method="dwf-lam", seed=seed)
    if lr is not None:
        base["lr"] = lr
    if recovery:
        base["recovery"] = recovery
    if relative:
        base["relative"] = True
    return [dict(base, lam=lam) for lam in lams]


def plan_peers(dataset: str, model: str, opt: str, batch_size: int, seed: int = 0,
               lr: float | None = None) -> list[dict[str, Any]]:
    """Dense and ModelPruning (at ``PEER_TARGETS``) in the same setting as :func:`plan`: the frontier to compare with
    and whether dense training is stable at ``lr``."""
    base = {k: v for k, v in plan(dataset, model, opt, batch_size, [0.0], seed, lr=lr)[0].items() if k != "lam"}
    return [dict(base, method="dense")] + [dict(base, method="model-pruning", target=t) for t in PEER_TARGETS]


def peer_table(rows: list[dict]) -> str:
    """Dense and ModelPruning rows of :func:`plan_peers`, one line per run."""
    out = ["| data | model | optimizer | batch | lr | method | zeros % | compression ratio | accuracy % |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: _order_peer(r["config"])):
        c, res = r["config"], r["results"]
        acc = "diverged" if res.get("acc") is None else f"{100 * res['acc']:.2f}"
        out.append(f"| {c['dataset']} | {c['model']} | {c['optimizer']} | {c['batch_size']} | {c['lr']:g} | "
                   f"{c['method']} | {100 * res.get('sparsity', 0.0):.2f} | {res.get('compression_ratio', 0.0):.1f} | "
                   f"{acc} |")
    return "\n".join(out)


def _order_peer(config: dict) -> tuple:
    return (config["dataset"], config["model"], config["optimizer"], config["batch_size"], config["lr"],
            config["method"], config.get("target", 0.0))


def _order(row: dict) -> tuple:
    c = row["config"]
    return (c["dataset"], c["model"], c["optimizer"], c["batch_size"], c["lr"], c.get("relative", False),
            row_recovery(c), c["lam"])


def _lam(config: dict) -> str:
    return f"rel. {config['lam']:g}" if config.get("relative") else f"{config['lam']:g}"


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, one line per run (a relative λ, without units, is written "rel. λ")."""
    out = [
        "| data | model | optimizer | batch | lr | recovery | λ | zeros % | compression ratio | accuracy % "
        "| emptied layers |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=_order):
        c, res = r["config"], r["results"]
        cell = (f"| {c['dataset']} | {c['model']} | {c['optimizer']} | {c['batch_size']} | {c['lr']:g} | "
                f"{recovery_text(c)} | ")
        if res.get("acc") is None:
            out.append(cell + f"{_lam(c)} | {'diverged' if 'diverged' in res else 'error'} | | | |")
            continue
        out.append(cell + f"{_lam(c)} | {100 * res['sparsity']:.2f} | {res['compression_ratio']:.1f} | "
                   f"{100 * res['acc']:.2f} | {', '.join(res.get('emptied') or []) or '—'} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    matrix.cell_arguments(parser, model="lenet300", opt="adamw", results=PATH)
    parser.add_argument("--lam", type=float, nargs="+", default=list(DEFAULT_LAMS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--recovery", type=parse_recovery, default=0.0,
                        help="FixedLamConfig(recovery=...): λ ramped, then released for this fraction of the run (0: "
                             "constant; 'default': the library's default, stored as its value)")
    parser.add_argument("--relative", action="store_true", help="FixedLamConfig(relative=True): λ without units")
    parser.add_argument("--lr", type=float, default=None, help="the optimizer's peak LR (default: the matrix's)")
    parser.add_argument("--peers", action="store_true",
                        help="also run dense and ModelPruning at 90 / 98 / 99.5 %% in the same setting")
    args = parser.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "offline")
    configs = plan(args.data, args.model, args.opt, args.bs, args.lam, args.seed, args.recovery, args.relative, args.lr)
    if args.peers:
        configs += plan_peers(args.data, args.model, args.opt, args.bs, args.seed, args.lr)
    done = list(run_plan(configs, args.results, args.data_dir).values())
    print(table([r for r in done if r["config"]["method"] == "dwf-lam"]))
    peers = [r for r in done if r["config"]["method"] != "dwf-lam"]
    if peers:
        print(peer_table(peers))


if __name__ == "__main__":
    main()
