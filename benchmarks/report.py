"""Tables and frontier plots from the sweep results.

python -m benchmarks.report            # full results -> benchmarks/results/full_table.md, full_<dataset>_<model>.png
python -m benchmarks.report --quick    # quick results
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

from benchmarks.harness.plots import pyplot, save
from benchmarks.harness.store import RESULTS, read_rows
from benchmarks.harness.tables import aggregate, fmt_cr

CRS = (10, 20, 50, 100, 200, 500)
METHODS = (
    "dense",
    "dwf-d2",
    "dwf-d3",
    "dwf-d4",
    "dwf-target-d2",
    "dwf-target-d3",
    "dwf-target-d4",
    "model-pruning",
    "oneshot",
    "oneshot-ft",
)
LABELS = {
    "dense": "dense",
    "dwf-d2": "DWF D=2 (shallow)",
    "dwf-d3": "DWF D=3",
    "dwf-d4": "DWF D=4",
    **{f"dwf-target-d{d}": f"DWF D={d}, target_sparsity" for d in (2, 3, 4)},
    "model-pruning": "ModelPruning (gradual L1)",
    "oneshot": "one-shot magnitude",
    "oneshot-ft": "one-shot + fine-tune",
}


def load(mode: str) -> list[dict]:
    """Every row of the sweep's ``<mode>.jsonl``."""
    return read_rows(RESULTS / f"{mode}.jsonl")


#: Pruning to 99 % of an odd number of weights gives CR 99.98, not 100: compare with this relative slack.
CR_SLACK = 0.995


def best_at(rows: list[dict], cr: float) -> float | None:
    """Best accuracy among runs whose compression ratio is at least ``cr`` (0.5 % slack; None if no run gets there)."""
    accs = [
        r["results"]["acc"]
        for r in rows
        if r["results"]["acc"] is not None and r["results"]["compression_ratio"] >= CR_SLACK * cr
    ]
    return max(accs) if accs else None


#: Recipe settings shown in each table's heading: config key, label.
_RECIPE = (
    ("factor_lr_multiplier", "DWF factor_lr_multiplier"),
    ("factor_lr_warmup", "factor_lr_warmup"),
    ("recovery", "target-mode recovery"),
)


def _values(by_method: dict[str, list[dict]], name: str) -> str:
    return ", ".join(sorted({str(r["config"][name]) for rs in by_method.values() for r in rs if name in r["config"]}))


def tables(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in aggregate(rows):
        groups[(r["config"]["dataset"], r["config"]["model"])][r["config"]["method"]].append(r)
    out = []
    for (dataset, model), by_method in groups.items():
        cfg = next(iter(by_method.values()))[0]["config"]
        extra = "".join(f", {label} {_values(by_method, name)}" for name, label in _RECIPE if _values(by_method, name))
        out.append(
            f"### {dataset} / {model} ({cfg['epochs']} epochs, batch {cfg['batch_size']}, SGD lr {cfg['lr']} "
            f"momentum {cfg['momentum']}{extra})\n"
        )
        out.append(
            "Best test accuracy (%) among runs with compression ratio ≥ CR (0.5 % slack for rounding; — : no run "
            "reached it); "
            "a config run with several seeds counts with its mean.\n"
        )
        out.append("| method | " + " | ".join(f"CR ≥ {c}" for c in CRS) + " |")
        out.append("|---|" + "---|" * len(CRS))
        for method in METHODS:
            if method not in by_method:
                continue
            if method == "dense":
                acc = by_method["dense"][0]["results"]["acc"]
                out.append(f"| dense (CR 1) | {100 * acc:.2f} |" + " |" * (len(CRS) - 1))
                continue
            cells = [best_at(by_method[method], c) for c in CRS]
            out.append(
                f"| {LABELS[method]} | " + " | ".join("—" if a is None else f"{100 * a:.2f}" for a in cells) + " |"
            )
        out.append("\nEvery run (λ for DWF, target sparsity for pruning):\n")
        out.append("| method | λ / target | accuracy (%) | CR | train s |")
        out.append("|---|---|---|---|---|")
        for method in METHODS:
            for r in sorted(
                by_method.get(method, []), key=lambda r: r["config"].get("lam", r["config"].get("target", 0))
            ):
                c, res = r["config"], r["results"]
                knob = c.get("lam", c.get("target", ""))
                if res["acc"] is None:
                    out.append(
                        f"| {LABELS[method]} | {knob} | diverged in {res['diverged']} (NaN/Inf factors, stopped by "
                        "the callback) | — | — |"
                    )
                    continue
                reached = f" (reached {100 * res['sparsity']:.2f} %)" if method.startswith("dwf-target") else ""
                acc = f"{100 * res['acc']:.2f}" + (
                    f" ± {100 * res['acc_sd']:.2f} (mean ± sd of {res['n']} seeds)" if res.get("n", 1) > 1 else ""
                )
                out.append(
                    f"| {LABELS[method]} | {knob}{reached} | {acc} | {fmt_cr(res['compression_ratio'])} | "
                    f"{res.get('train_seconds', 0):.0f} |"
                )
        out.append("")
    return "\n".join(out)


def plots(rows: list[dict], mode: str) -> list[Path]:
    plt = pyplot()
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in aggregate(rows):
        groups[(r["config"]["dataset"], r["config"]["model"])].append(r)
    paths = []
    for (dataset, model), group in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method in METHODS:
            pts = sorted(
                (r["results"]["compression_ratio"], 100 * r["results"]["acc"])
                for r in group
                if r["config"]["method"] == method
                and r["results"]["acc"] is not None
                and math.isfinite(r["results"]["compression_ratio"])
            )
            if not pts:
                continue
            if method == "dense":
                ax.axhline(pts[0][1], color="k", ls="--", lw=1, label=f"dense ({pts[0][1]:.2f} %)")
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, label=LABELS[method])
        ax.set_xscale("log")
        ax.set_xlabel("compression ratio (weights / non-zeros), log scale")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{dataset} / {model}, {group[0]['config']['epochs']} epochs ({mode})")
        dense = [100 * r["results"]["acc"] for r in group if r["config"]["method"] == "dense"]
        if dense:  # zoom on the interesting band; runs far below it (one-shot without fine-tune) leave the plot
            ax.set_ylim(dense[0] - 15, dense[0] + 1.5)
            ax.text(
                0.99,
                0.01,
                "runs more than 15 points below dense are off the plot (see the table)",
                transform=ax.transAxes,
                ha="right",
                va="bottom",
                fontsize=7,
                color="gray",
            )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(save(fig, RESULTS / f"{mode}_{dataset}_{model}.png"))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    rows = load(mode)
    flag = " --quick" if args.quick else ""
    text = (
        f"# Benchmark results ({mode})\n\nReproduce: `python -m benchmarks.sweep{flag} && "
        f"python -m benchmarks.report{flag}`\n\n"
        + tables(rows)
    )
    (RESULTS / f"{mode}_table.md").write_text(text)
    for p in plots(rows, mode):
        print(p)
    print(RESULTS / f"{mode}_table.md")


if __name__ == "__main__":
    main()
