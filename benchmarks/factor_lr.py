"""The factor LR multiplier on matrix cells: ``DWFCallback(depth=3, target_sparsity=T)`` with one multiplier for every
factorized tensor (``FactorLRConfig(multiplier=m)``) instead of the default ``"auto"`` (one per tensor, from its
weights' RMS), in the matrix's training setting (same optimizer, LR schedule, epochs, data order), beside the matrix's
own rows of the cell (DWF with ``"auto"``, ModelPruning, PAT).

    python -m benchmarks.factor_lr --model lenet5 --opt sgd --bs 64 --target 0.995 --multiplier 1 --seed 0 1 2
    python -m benchmarks.factor_lr --model lenet300 --opt adamw --target 0.98 --multiplier 1 2.5 5 --depth 2 4
    python -m benchmarks.factor_lr --model lenet5 --opt sgd --bs 64 --target 0.995 --multiplier min sqrt --seed 0 1 2
    python -m benchmarks.factor_lr --model lenet5 --opt sgd --bs 64 --target 0.995 --multiplier at-2rms --step-cap 3

It is how the LeNet-5 SGD batch-64 99.5 % miss of the matrix was diagnosed (docs, "Why"): the SGD ``"auto"`` of that
time gave that net's layers ×1.0 to ×6.0. ``--multiplier min`` / ``sqrt`` keep ``"auto"``'s per-layer values but give
every tensor the smallest of them, or move each halfway (geometrically) to it; ``at-2rms`` lowers each by 2^(2−2/D)
(the rule evaluated at twice the weights' RMS: the SGD ``"auto"`` before the step cap); ``track-rms`` / ``track-max``
lower them during the fit as the weights grow (:data:`benchmarks.harness.methods.MULTIPLIER_RULES`): whether a
narrower spread, faster factors, or a falling multiplier, is the SGD rule. The phase rules split target mode's run at
its recovery point (the support fixed): ``ramp-half`` halves the planned values before it, ``recovery-double`` doubles
them after it, and ``recut-rms`` re-plans every tensor there from the RMS of its survivors; ``--adam-auto`` sets the
Adam-type ``"auto"`` value they start from. ``cut-relative`` / ``cut-halfrel`` keep the multipliers and rank the weights
of target mode's cuts by ``|w|`` over their tensor's RMS (to the power 1 / 0.5); ``cut-bn-init`` ranks a
BatchNorm-fed tensor's weights at its train-start scale (each output channel rescaled to the tensor's RMS then),
``cut-init-scale`` every weight by ``|w|`` times its tensor's train-start RMS (``cut-bn-init-scale`` both). Two
diagnostics: ``cut-alloc-mp`` gives each layer the share of the survivors that ModelPruning's matrix row of the same
cell and seed ended with (whether the allocation explains a miss), ``no-penalty`` holds λ at 0 so that target mode's
gradual cut alone makes the zeros (whether the penalty or the factorized training costs it). ``--step-cap K`` (or
``none``) sets
``FactorLRConfig(step_cap=K)``: ``--multiplier at-2rms --step-cap none`` trains as the defaults did before the step
cap. Rows before 2026-12-06 ran on that earlier default: their ``at-rms`` rule is today's ``"auto"`` without the cap,
their ``cap-K`` rows the earlier ``"auto"`` with ``step_cap=K`` (a probe callback then), and their ``at-rms+cap-3``
rows today's defaults (the same rule; the probe computed the cap in another order, so the last digits may differ).
A rule's rows from before the cap share their key with today's runs of it: pass ``--step-cap 3`` to run it on today's
code (its rows then carry ``step_cap``).
``--multiplier auto`` names the library's rule, to run it under another ``--step-cap``. The recovery-phase rules
change the run at target mode's recovery point (the support fixed): ``recovery-cap-1`` caps every weight at one dense
step from there, ``recovery-dense`` moves every survivor exactly as a dense weight, ``recovery-cap-3`` (with
``--step-cap 1``) lets the survivors move 3 times as far (:data:`~benchmarks.harness.methods.RECOVERY_CAPS`): the
library's SGD default since 2026-12-06 (``FactorLRConfig(pattern_step_cap=1)``). A row with a ``step_cap`` key ran
that cap throughout (``pattern_step_cap=None``); the ``--peers`` DWF rows made before the change are in
``factor_lr_superseded.jsonl``.
``recovery-collapse`` / ``recovery-factors`` set what the survivors train as once the pattern is fixed
(``FactorLRConfig(fixed_pattern="dense")`` / ``"factors"``, the default) under either optimizer. The AdamW rows of
``recovery-collapse`` on the main matrix cells (seed 0) ran as the first pass of a matrix re-run with the dense
fine-tune as the Adam-type default (stopped after 11 cells, when it lost up to 0.96 points) and were moved here.
``recovery-collapse-x3`` gives the dense fine-tune 3 times the optimizer's step (a probe of why it lost there).
``--peers`` also runs the cell's dense, default-DWF and ModelPruning configs (the matrix's own keys), for the cells
the matrix does not run: the crossing datasets of :data:`~benchmarks.matrix.SUBSETS` (``fashion-mnist-4k``,
``mnist-subset-2k``: Fashion-MNIST at the MNIST subset's size, MNIST at the small-data axis's), which tell apart
whether the data or its size decides which runs want slower factors::

    python -m benchmarks.factor_lr --data mnist-subset-2k --epochs 40 --model lenet5 --target 0.9 0.98 0.995 \
        --multiplier min --step-cap 3 --seed 0 1 2 --peers
    python -m benchmarks.factor_lr --data mnist-subset-2k --epochs 40 --model lenet5 --target 0.9 0.98 0.995 \
        --multiplier auto --step-cap 1 --seed 0 1 2

Rows carry each epoch's mean training loss (``train_loss``) and the final net's training accuracy (``train_acc``)
since 2026-12-06.
``--depth`` runs the cell with ``DWFCallback(depth=D, ...)`` instead of 3 (the matrix's own columns stay D = 3):
whether the Adam-type ``"auto"`` multiplier, chosen at D = 3, holds at other depths.
One row per run goes to ``benchmarks/results/factor_lr.jsonl`` (runs already
there are skipped, as in the matrix); the table of every row is printed.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Any

from benchmarks import matrix
from benchmarks.harness.methods import MULTIPLIER_RULES
from benchmarks.harness.runs import run_plan
from benchmarks.harness.store import RESULTS, load_rows
from benchmarks.harness.tables import fmt_acc
from lightning_dwf.core import functional

PATH = RESULTS / "factor_lr.jsonl"


def plan(
    dataset: str, model: str, opt: str, batch_size: int, targets: list[float], multipliers: list[float | str],
    seeds: list[int], depth: int = 3, epochs: int | None = None, adam_auto: float | None = None,
    step_cap: float | None | str = "default",
) -> list[dict[str, Any]]:
    """One DWF config per target, multiplier and seed on the matrix cell ``(dataset, model, opt, batch_size)``
    (a ``depth`` key only where it is not the matrix's 3, so that D = 3 rows keep their keys; ``epochs``: the
    setting's own by default, given for the short-run and small-data cells of :data:`~benchmarks.matrix.AXIS`;
    ``adam_auto``: the Adam-type ``"auto"`` multiplier the rules start from, where it is not the library's;
    ``step_cap``: ``FactorLRConfig.step_cap`` where it is not the library's default, ``None`` for no cap)."""
    base = matrix.base_config(dataset, model, opt, batch_size, epochs)
    if depth != 3:
        base["depth"] = depth
    if adam_auto is not None:
        base["adam_auto"] = adam_auto
    if step_cap != "default":
        base["step_cap"] = step_cap
    return [
        dict(base, method="dwf", target=t, seed=s, factor_lr_multiplier=m)
        for t in targets for m in multipliers for s in seeds
    ]


def plan_peers(
    dataset: str, model: str, opt: str, batch_size: int, targets: list[float], seeds: list[int],
    epochs: int | None = None,
) -> list[dict[str, Any]]:
    """The matrix's own configs of a cell (dense, DWF with the defaults, ModelPruning; the same keys as the matrix's),
    for a cell the matrix does not run (``--peers``: the crossing datasets of :data:`~benchmarks.matrix.SUBSETS`)."""
    base = matrix.base_config(dataset, model, opt, batch_size, epochs)
    return [dict(base, method="dense", seed=s) for s in seeds] + [
        dict(base, method=m, target=t, seed=s) for t in targets for m in ("dwf", "model-pruning") for s in seeds
    ]


def _layers(runs: list[dict]) -> str:
    """The first seed's non-zeros per layer, ``a/b/c`` in layer order (``—`` for rows without them)."""
    first = min(runs, key=lambda r: r["config"]["seed"])["results"].get("layer_nonzeros")
    return "/".join(str(v) for v in first.values()) if first else "—"


def table(rows: list[dict], matrix_rows: list[dict]) -> str:
    """One line per (cell, epochs, target, depth, multiplier): its seeds, then the matrix's DWF (D = 3, ``"auto"``),
    ModelPruning and PAT on the same seeds (or the ``--peers`` rows of a cell the matrix does not run). Where a
    reference method has rows made on the probe's own host (the CPU's kernel ISA, ``machine.isa``: other kernels give
    other bits), only those are shown, so a probe is read against a baseline of its own host."""
    peers = [r for r in rows if "factor_lr_multiplier" not in r["config"]]
    reference = matrix.table_cells(matrix_rows + peers)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        c = r["config"]
        if "factor_lr_multiplier" not in c:
            continue
        mult = c["factor_lr_multiplier"]
        if "adam_auto" in c:
            mult = f"{mult} (Adam auto {c['adam_auto']:g})"
        if "step_cap" in c:
            mult = f"{_multiplier(mult)}, step cap {'none' if c['step_cap'] is None else format(c['step_cap'], 'g')}"
        key = (c["dataset"], c["model"], c["optimizer"], c["batch_size"], c["epochs"], c["target"], c.get("depth", 3),
               mult)
        groups[key].append(r)
    out = [
        "| data | model | optimizer | batch | epochs | target | depth | multiplier | DWF % (seeds) | non-zeros per "
        "layer (first seed) | DWF D=3 auto % | ModelPruning % | PAT % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, model, opt, bs, epochs, target, depth, mult), runs in sorted(groups.items(), key=_order):
        seeds, hosts = {r["config"]["seed"] for r in runs}, {_isa(r) for r in runs}
        cell = reference.get((data, model, opt, bs, "scratch", epochs, target), {})
        same = {}
        for m in matrix.METHODS[1:]:
            seeded = [r for r in cell.get(m, []) if r["config"]["seed"] in seeds]
            same[m] = [r for r in seeded if _isa(r) in hosts] or seeded
        out.append(
            f"| {data} | {model} | {opt} | {bs} | {epochs} | {100 * target:g} % | {depth} | {_multiplier(mult)} | "
            f"{fmt_acc(runs)} | "
            f"{_layers(runs)} | {fmt_acc(same['dwf'])} | {fmt_acc(same['model-pruning'])} | "
            f"{fmt_acc(same['pat'])} |"
        )
    return "\n".join(out)


def _isa(row: dict) -> str | None:
    """The kernel ISA of the host that made ``row`` (``None`` for rows made before rows recorded it)."""
    return (row.get("machine") or {}).get("isa")


def _order(item: tuple[tuple, list[dict]]) -> tuple:
    """Table order: by cell, epochs, target and depth, then the numeric multipliers before the rules."""
    *cell, mult = item[0]
    return (*cell, isinstance(mult, str), str(mult) if isinstance(mult, str) else mult)


def _multiplier(value: float | str) -> str:
    """A multiplier as the table shows it: ``×m``, or the rule's name."""
    return value if isinstance(value, str) else f"×{value:g}"


def _multiplier_argument(text: str) -> float | str:
    """``--multiplier``: a number, or a rule of :data:`~benchmarks.harness.methods.MULTIPLIER_RULES`."""
    if text in MULTIPLIER_RULES or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number, 'auto' or one of {MULTIPLIER_RULES}, got {text!r}") from None


def _step_cap_argument(text: str) -> float | None | str:
    """``--step-cap``: a number, ``none`` (no cap), or ``default`` (the library's)."""
    if text.lower() in ("none", "default"):
        return None if text.lower() == "none" else "default"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number or 'none', got {text!r}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    matrix.cell_arguments(parser, model="lenet5", opt="sgd", results=PATH)
    parser.add_argument("--target", type=float, nargs="+", default=[0.995])
    parser.add_argument("--multiplier", type=_multiplier_argument, nargs="+", default=[1.0],
                        help=f"numbers (one for every tensor) or rules on the per-layer auto values {MULTIPLIER_RULES}")
    parser.add_argument("--seed", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=None,
                        help="the cell's epochs (default: the setting's; 3 or 40 for the short-run / small-data axis)")
    parser.add_argument("--depth", type=int, nargs="+", default=[3], help="DWF's depth D (the matrix's is 3)")
    parser.add_argument("--adam-auto", type=float, default=None,
                        help="the Adam-type \"auto\" multiplier in place of the library's "
                             f"{functional.DECOUPLED_AUTO_MULTIPLIER:g} (what the rules start from)")
    parser.add_argument("--step-cap", type=_step_cap_argument, default="default",
                        help="FactorLRConfig.step_cap (a number, or 'none' for no cap; default: the library's)")
    parser.add_argument("--peers", action="store_true",
                        help="also run the cell's dense, default DWF and ModelPruning configs (cells outside the "
                             "matrix)")
    parser.add_argument("--report", action="store_true", help="print the table of every row, run nothing")
    args = parser.parse_args(argv)
    if args.adam_auto is not None:  # read at train start by auto_lr_multiplier
        functional.DECOUPLED_AUTO_MULTIPLIER = args.adam_auto
    os.environ.setdefault("WANDB_MODE", "offline")
    if args.report:
        done = load_rows(args.results)
    else:
        configs = [
            cfg for depth in args.depth
            for cfg in plan(args.data, args.model, args.opt, args.bs, args.target, args.multiplier, args.seed, depth,
                            args.epochs, args.adam_auto, args.step_cap)
        ]
        if args.peers:
            peers = plan_peers(args.data, args.model, args.opt, args.bs, args.target, args.seed, args.epochs)
            configs = peers + configs
        done = run_plan(configs, args.results, args.data_dir, matrix.load_matrix_dataset)
    print(table(list(done.values()), list(load_rows(matrix.PATH).values())))


if __name__ == "__main__":
    main()
