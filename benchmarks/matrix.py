"""Generalization matrix, defaults only: DWF as shipped (``DWFCallback(depth=3, target_sparsity=T)``) against untuned
peers on every model, optimizer and batch size.

    python -m benchmarks.matrix                               # everything (resumes): first pass, then the seed pass
    python -m benchmarks.matrix --pass 1                      # the first pass only (seed 0)
    python -m benchmarks.matrix --only model=vit,opt=adamw    # a subset (keys: data model opt bs target method start)
    python -m benchmarks.matrix --list                        # the plan and its estimated time, nothing run
    python -m benchmarks.matrix --report                      # matrix_table.md + matrix_gap.png
    python -m benchmarks.matrix --only model=lenet5,bs=256 --max-batches 20 --results /tmp/smoke.jsonl   # a smoke run

Cells: Fashion-MNIST × {LeNet-300-100, LeNet-5, the BN CNN, the tiny ViT} and the MNIST subset × LeNet-300-100;
and an axis of short runs and small data (:data:`AXIS`, from scratch, ``--only epochs=3`` /
``--only data=fashion-mnist-2k``): LeNet-300-100, LeNet-5 and the BN CNN trained for 3 epochs of Fashion-MNIST at
batch 64 and 256, and for 40 epochs of a 2,000-image Fashion-MNIST subset (200 per class) at batch 64;
optimizers SGD (lr 0.1, momentum 0.9, no weight decay) and AdamW (lr 1e-3, weight decay 0.01, torch's default, on
every parameter; DWF neutralizes it on its factors, which get its own penalty instead), both with a linear LR warm-up
over the first 5 % of the steps, then cosine to 0, per step; batch sizes 64 and 256; targets 90 / 98 / 99.5 %.
Methods per cell, at the same epochs, optimizer, schedule and data order: dense; Lightning's ModelPruning (global L1,
the sweep's cubic per-epoch schedule to the target at 70 % of training,
:class:`benchmarks.harness.methods.LayerPruning`);
torchao's prototype PAT (``PruneOptimizer`` around the same optimizer, a global per-element magnitude constraint on
a cubic ramp, warm-up 10 % of the run, mask frozen from 60 %; ``pip install -e '.[bench]'``, skipped with a logged
reason when torchao is missing); DWF with ``DWFCallback(depth=3, target_sparsity=T)`` and nothing else that changes
training (``collapse=CollapseConfig(save=False), verbose=False`` only silence its file and table). All methods
prune the Linear/Conv
weights, and sparsity is counted over them. From pretrained (batch 256, seed 0): the dense cell's trained net
(``<results>/matrix_dense/*.pt``) sparsified for a third of its epochs by ``DWFCallback(depth=3, target_sparsity=T,
factorize=FactorizeConfig(init="balanced"))`` and by ModelPruning. The seed pass adds seeds 1 and 2 (every
method of the cell, and dense from scratch; from pretrained the same seed-0 dense net) to each cell where DWF is not
ahead of the best peer by 0.5 points on seed 0 (close cells, and cells where DWF is behind: a verdict either way then
rests on three seeds), and to every cell seeded before, so that a method re-run later (its old rows moved to
``matrix_superseded.jsonl``, e.g. DWF under AdamW when ``"auto"`` changed) is compared on the same seeds.

One JSON row per run (config, results, versions) goes to ``benchmarks/results/matrix.jsonl``; runs already there are
skipped. A DWF run stopped on NaN/Inf factors is a ``diverged`` row; a configuration DWF refuses (e.g. a target it
cannot reach in the planned steps) an ``error`` row; neither stops the matrix.

Time, first pass (260 runs, ``--list`` prints the estimate): about 2.8 hours of training on 2 CPU cores with the epochs
of :data:`EPOCHS` (LeNet-300-100 12, LeNet-5 6, BN CNN 5, ViT 6, MNIST subset 30; from pretrained a third of them),
plus about a second of Trainer set-up per run. Basis, :data:`SECONDS_PER_EPOCH` (dense, one Fashion-MNIST epoch)::

    model      batch 64   batch 256   source
    lenet300      3.1        1.3      sweep rows (full.jsonl): b256 dense 20 epochs; b64 from the MNIST-subset b64 steps
    lenet5        5.5        4.9      the same
    cnn-bn       14.0        9.5      the same (b256: the DWF / ModelPruning rows, dense's one row was disturbed)
    vit          14.0       10.0      assumed equal to the BN CNN (similar MACs per image; in the smoke runs, under the
                                      same load, the ViT took at most the CNN's time at both batch sizes)

and :data:`METHOD_COST` (DWF D=3 1.4× dense, from the sweep's rows; PAT 1.1×, from the smoke runs). The smoke runs
(every Fashion-MNIST model, SGD, target 98 %, batch 64 and 256, 4 epochs of 40 batches) ran while another job kept
the 2 cores loaded (load average 3.5-5.8): their own seconds per epoch (e.g. LeNet-5 b256 dense 8.8, ViT b256 28) were
2-5× the quiet-machine numbers and varied by 10× between repeats, so they set only the ViT's relative cost.
"""

from __future__ import annotations

import argparse
import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import plots
from benchmarks.harness.runs import run_plan
from benchmarks.harness.store import RESULTS, key, load_rows
from benchmarks.harness.tables import fmt_acc, mean_acc
from examples.data import ImageData, load_dataset

PATH = RESULTS / "matrix.jsonl"
#: (dataset, model) settings; the MNIST subset only with LeNet-300-100.
SETTINGS = (
    ("fashion-mnist", "lenet300"),
    ("fashion-mnist", "lenet5"),
    ("fashion-mnist", "cnn-bn"),
    ("fashion-mnist", "vit"),
    ("mnist-subset", "lenet300"),
)
#: The short-run and small-data axis, from scratch only: (dataset, model, epochs, batch sizes). Short runs: 3 epochs of
#: full Fashion-MNIST (705 / 2,814 steps at batch 256 / 64); small data: 2,000 training images (200 per class) for 40
#: epochs at batch 64 (1,280 steps, the length of the outside task where SGD trailed ModelPruning).
AXIS = tuple(
    [("fashion-mnist", m, 3, (64, 256)) for m in ("lenet300", "lenet5", "cnn-bn")]
    + [("fashion-mnist-2k", m, 40, (64,)) for m in ("lenet300", "lenet5", "cnn-bn")]
)
#: Small-data datasets: name → (the full dataset, training images kept, stratified; the full test set is kept). The
#: axis uses ``fashion-mnist-2k``; ``fashion-mnist-4k`` (the MNIST subset's size) and ``mnist-subset-2k`` cross data
#: and size for :mod:`benchmarks.factor_lr`'s probes (which kind of run wants slower factors).
SUBSETS = {
    "fashion-mnist-2k": ("fashion-mnist", 2_000),
    "fashion-mnist-4k": ("fashion-mnist", 4_000),
    "mnist-subset-2k": ("mnist-subset", 2_000),
}
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "sgd": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.0),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=0.01),
}
BATCH_SIZES = (64, 256)
TARGETS = (0.9, 0.98, 0.995)
#: Linear LR warm-up, fraction of the steps (keeps dense LeNet-5 with SGD lr 0.1 alive on every seed).
WARMUP = 0.05
METHODS = ("dense", "model-pruning", "pat", "dwf")
PRETRAINED_METHODS = ("dwf-balanced", "model-pruning")
#: Batch size of the from-pretrained runs (and of the dense nets they start from).
PRETRAINED_BATCH = 256
#: Epochs per setting, the same for every method of a cell (from pretrained: a third of them).
EPOCHS = {
    ("fashion-mnist", "lenet300"): 12,
    ("fashion-mnist", "lenet5"): 6,
    ("fashion-mnist", "cnn-bn"): 5,
    ("fashion-mnist", "vit"): 6,
    ("mnist-subset", "lenet300"): 30,
}
#: Dense seconds per Fashion-MNIST epoch (60,000 images) at batch 64 / 256 on 2 quiet CPU cores (see the docstring).
SECONDS_PER_EPOCH = {
    "lenet300": {64: 3.1, 256: 1.3},
    "lenet5": {64: 5.5, 256: 4.9},
    "cnn-bn": {64: 14.0, 256: 9.5},
    "vit": {64: 14.0, 256: 10.0},
}
#: Cost of a method relative to dense training.
METHOD_COST = {"dense": 1.0, "model-pruning": 1.0, "pat": 1.1, "dwf": 1.4, "dwf-balanced": 1.4}
#: Trainer set-up and test evaluation per run, seconds.
RUN_OVERHEAD = 1.5
TRAIN_SIZE = {"fashion-mnist": 60_000, "mnist-subset": 4_000, **{name: size for name, (_, size) in SUBSETS.items()}}
EXTRA_SEEDS = (1, 2)
#: The seed pass runs where DWF − best peer is below this (accuracy fraction: 0.5 points): close or behind.
CLOSE = 0.005
#: Short names accepted by ``--only``.
ALIASES = {"data": "dataset", "opt": "optimizer", "bs": "batch_size"}


# ----------------------------------------------------------------------------------------------------------------- plan
def base_config(
    dataset: str, model: str, opt: str, batch_size: int, epochs: int | None = None, max_batches: int | None = None
) -> dict[str, Any]:
    """The config keys every run of a (setting, optimizer, batch size) shares."""
    cfg = dict(
        dataset=dataset,
        model=model,
        batch_size=batch_size,
        epochs=epochs or EPOCHS[(dataset, model)],
        warmup=WARMUP,
        start="scratch",
        seed=0,
        **OPTIMIZERS[opt],
    )
    if max_batches:
        cfg["max_batches"] = max_batches
    return cfg


def pretrained_epochs(epochs: int) -> int:
    return max(1, round(epochs / 3))


def plan_first_pass(
    epochs: int | None = None, max_batches: int | None = None, axis: bool = True
) -> list[dict[str, Any]]:
    """Every first-pass run (seed 0); each dense run comes before the sparse runs of its cells and its fine-tunes.
    ``axis``: the short-run and small-data cells (:data:`AXIS`) too, after the main ones."""
    out = []
    for dataset, model in SETTINGS:
        for opt in OPTIMIZERS:
            for batch_size in BATCH_SIZES:
                base = base_config(dataset, model, opt, batch_size, epochs, max_batches)
                out.append(dict(base, method="dense"))
                out += [dict(base, method=m, target=t) for t in TARGETS for m in METHODS[1:]]
            base = base_config(dataset, model, opt, PRETRAINED_BATCH, epochs, max_batches)
            short = dict(
                base, start="pretrained", epochs=pretrained_epochs(base["epochs"]), dense_epochs=base["epochs"]
            )
            out += [dict(short, method=m, target=t) for t in TARGETS for m in PRETRAINED_METHODS]
    for dataset, model, setting_epochs, batch_sizes in AXIS if axis else ():
        for opt in OPTIMIZERS:
            for batch_size in batch_sizes:
                base = base_config(dataset, model, opt, batch_size, epochs or setting_epochs, max_batches)
                out.append(dict(base, method="dense"))
                out += [dict(base, method=m, target=t) for t in TARGETS for m in METHODS[1:]]
    return out


def load_matrix_dataset(name: str, root: str | None = None) -> ImageData:
    """A dataset by name (:func:`examples.data.load_dataset`), or a small-data subset of :data:`SUBSETS`
    (:func:`training_subset` of its full dataset)."""
    if name not in SUBSETS:
        return load_dataset(name, root)
    full, size = SUBSETS[name]
    return training_subset(load_dataset(full, root), size, name)


def training_subset(data: ImageData, size: int, name: str) -> ImageData:
    """``size // classes`` training images of every class, drawn with seed 0 and kept in their order (standardized
    with the full training set's statistics, as loaded), and the full test set."""
    per_class = size // data.num_classes
    order = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))
    keep = torch.cat([order[data.train_y[order] == c][:per_class] for c in range(data.num_classes)]).sort().values
    return ImageData(name, data.train_x[keep], data.train_y[keep], data.test_x, data.test_y)


def dense_source(cfg: dict[str, Any]) -> dict[str, Any]:
    """The dense run a from-pretrained run starts from."""
    src = {k: v for k, v in cfg.items() if k not in ("target", "dense_epochs")}
    return dict(src, method="dense", start="scratch", epochs=cfg["dense_epochs"], seed=0)


def cell_key(cfg: dict[str, Any]) -> str:
    """A from-scratch cell: the config without method and seed (dense rows belong to every target of their setting)."""
    return key({k: v for k, v in cfg.items() if k not in ("method", "seed")})


def seeded_cells(rows: Iterable[dict]) -> list[dict[str, Any]]:
    """Seed-0 cells (as their DWF config, from scratch or from pretrained) where DWF is less than :data:`CLOSE` ahead of
    the best peer (close, or behind), and cells seeded before (a method re-run later, e.g. with a new default, gets
    the seeds its cell already has, so that every method of a cell is compared on the same seeds)."""
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    dwf_cfg = {}
    seeded = set()
    for row in rows:
        c, res = row["config"], row["results"]
        if c["seed"] != 0 and "target" in c:
            seeded.add(cell_key(c))
        if c["seed"] != 0 or "target" not in c or res.get("acc") is None:
            continue
        acc[cell_key(c)][c["method"]] = res["acc"]
        if c["method"] in ("dwf", "dwf-balanced"):
            dwf_cfg[cell_key(c)] = c
    out = []
    for cell, dwf in dwf_cfg.items():
        by_method = acc[cell]
        peers = [by_method[m] for m in ("model-pruning", "pat") if m in by_method]
        if cell in seeded or (peers and by_method[dwf["method"]] - max(peers) < CLOSE):
            out.append(dwf)
    return out


def plan_second_pass(rows: Iterable[dict]) -> list[dict[str, Any]]:
    """Seeds 1 and 2 of every method in each :func:`seeded_cells` cell: from scratch with dense (once per setting),
    from pretrained from the same seed-0 dense net (the seed changes the sparse run: its data order and init)."""
    out: dict[str, dict[str, Any]] = {}
    for dwf in seeded_cells(rows):
        for seed in EXTRA_SEEDS:
            if dwf["start"] == "pretrained":
                cfgs = [dict(dwf, method=m, seed=seed) for m in PRETRAINED_METHODS]
            else:
                dense = {k: v for k, v in dwf.items() if k != "target"}
                cfgs = [dict(dense, method="dense", seed=seed)] + [dict(dwf, method=m, seed=seed) for m in METHODS[1:]]
            for cfg in cfgs:
                out.setdefault(key(cfg), cfg)
    return list(out.values())


def parse_only(text: str | None) -> dict[str, str]:
    """``"model=vit,opt=adamw"`` → ``{"model": "vit", "optimizer": "adamw"}``."""
    if not text:
        return {}
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    if any(len(p) != 2 for p in pairs):
        raise ValueError(f"--only takes key=value pairs separated by commas, got {text!r}.")
    return {ALIASES.get(k.strip(), k.strip()): v.strip() for k, v in pairs}


def selected(cfg: dict[str, Any], only: dict[str, str]) -> bool:
    """Whether ``cfg`` matches every ``key=value`` of ``only`` (values compared as numbers where they parse); dense runs
    match any ``target`` (they belong to every target's cell)."""
    for k, v in only.items():
        have = cfg.get(k)
        if k == "target" and cfg["method"] == "dense":
            continue
        try:
            if have is None or float(have) != float(v):
                return False
        except (TypeError, ValueError):
            if str(have) != v:
                return False
    return True


def estimate_seconds(cfg: dict[str, Any]) -> float:
    """Predicted training seconds of one run from :data:`SECONDS_PER_EPOCH` and :data:`METHOD_COST`."""
    per_epoch = SECONDS_PER_EPOCH[cfg["model"]][cfg["batch_size"]] * TRAIN_SIZE[cfg["dataset"]] / 60_000
    if cfg.get("max_batches"):
        per_epoch *= min(1.0, cfg["max_batches"] * cfg["batch_size"] / TRAIN_SIZE[cfg["dataset"]])
    return cfg["epochs"] * per_epoch * METHOD_COST[cfg["method"]] + RUN_OVERHEAD


# -------------------------------------------------------------------------------------------------------------- runs
def keeps_dense(cfg: dict[str, Any]) -> bool:
    """Whether the trained net of ``cfg`` is kept: the seed-0 dense runs at :data:`PRETRAINED_BATCH`, which the
    from-pretrained runs start from."""
    return cfg["method"] == "dense" and cfg["batch_size"] == PRETRAINED_BATCH and cfg["seed"] == 0


def run_all(
    plan: list[dict[str, Any]],
    results: Path,
    data_dir: str | None = None,
    loader: Callable[..., ImageData] = load_matrix_dataset,
) -> dict[str, dict]:
    """Run every config of ``plan`` not yet in ``results`` (appending one row each); returns all rows by key."""
    return run_plan(plan, results, data_dir, loader, dense_source=dense_source, keep_dense=keeps_dense)


# -------------------------------------------------------------------------------------------------------------- report
LABELS = {"dense": "dense", "model-pruning": "ModelPruning", "pat": "PAT", "dwf": "DWF", "dwf-balanced": "DWF"}


def length(cfg: dict[str, Any]) -> int:
    """The epochs of a run's setting: its own from scratch, its dense net's from pretrained (a short run and a main
    run of the same model are different cells)."""
    return cfg.get("dense_epochs", cfg["epochs"])


def table_cells(rows: Iterable[dict]) -> dict[tuple, dict[str, list[dict]]]:
    """Rows grouped by cell ``(dataset, model, optimizer, batch, start, setting epochs, target)`` and method; dense
    rows (and a from-pretrained cell's source) are filed under every target of their setting."""
    rows = list(rows)
    targets: dict[tuple, set] = defaultdict(set)

    def setting(c: dict[str, Any], start: str) -> tuple:
        return c["dataset"], c["model"], c["optimizer"], c["batch_size"], start, length(c)

    for r in rows:
        c = r["config"]
        if "target" in c:
            targets[setting(c, c["start"])].add(c["target"])
    cells: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        c = r["config"]
        if "target" in c:
            method = "dwf" if c["method"] == "dwf-balanced" else c["method"]
            cells[(*setting(c, c["start"]), c["target"])][method].append(r)
            continue
        for start in ("scratch", "pretrained"):
            if start == "pretrained" and (c["batch_size"] != PRETRAINED_BATCH or c["seed"] != 0):
                continue
            for t in targets[setting(c, start)]:
                cells[(*setting(c, start), t)]["dense"].append(r)
    return dict(sorted(cells.items(), key=lambda kv: kv[0]))


def gap(by_method: dict[str, list[dict]]) -> float | None:
    """DWF − best peer (ModelPruning, PAT) in points, on the seed means."""
    dwf = mean_acc(by_method.get("dwf", []))
    peers = [a for a in (mean_acc(by_method.get(m, [])) for m in ("model-pruning", "pat")) if a is not None]
    return None if dwf is None or not peers else 100 * (dwf - max(peers))


def flags(target: float, by_method: dict[str, list[dict]]) -> list[str]:
    """Diverged / refused runs, emptied layers, sparsity more than 0.1 points off the target."""
    out = []
    for method, runs in by_method.items():
        for r in runs:
            res, who = r["results"], f"{LABELS[method]} s{r['config']['seed']}"
            if "diverged" in res:
                out.append(f"diverged: {who}")
            if res.get("acc") is None and "error" in res:
                out.append(f"error: {who}")
            if res.get("emptied"):
                out.append(f"emptied {','.join(res['emptied'])}: {who}")
            if method != "dense" and res.get("sparsity") is not None and abs(res["sparsity"] - target) > 0.001:
                out.append(f"sparsity {100 * res['sparsity']:.2f}: {who}")
    return out


def sparsity_text(by_method: dict[str, list[dict]]) -> str:
    parts = []
    for m in ("model-pruning", "pat", "dwf"):
        vals = [r["results"]["sparsity"] for r in by_method.get(m, []) if r["results"].get("sparsity") is not None]
        if vals:
            parts.append(f"{LABELS[m]} {100 * sum(vals) / len(vals):.2f}")
    return " / ".join(parts) or "—"


def table(rows: Iterable[dict]) -> str:
    out = [
        "# Generalization matrix, defaults only",
        "",
        "Reproduce: `python -m benchmarks.matrix && python -m benchmarks.matrix --report`. Test accuracy (%) of the "
        "collapsed / pruned model; several seeds: mean (per seed). From pretrained: the dense column is the net the "
        'run started from, DWF is `FactorizeConfig(init="balanced")`. Sparsity over the Linear/Conv weights (%). '
        'Gap: DWF − best of '
        "ModelPruning and PAT, points.",
        "",
        "| data | model | opt | batch | start | epochs | target | dense | ModelPruning | PAT | DWF | sparsity | gap "
        "| flags |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (dataset, model, opt, batch, start, _, target), by_method in table_cells(rows).items():
        epochs = next(r["config"]["epochs"] for m, rs in by_method.items() if m != "dense" for r in rs)
        g = gap(by_method)
        cols = [
            dataset,
            model,
            opt,
            str(batch),
            start,
            str(epochs),
            f"{100 * target:g} %",
            *(fmt_acc(by_method.get(m, [])) for m in METHODS),
            sparsity_text(by_method),
            "—" if g is None else f"{g:+.2f}",
            "; ".join(flags(target, by_method)),
        ]
        out.append("| " + " | ".join(cols) + " |")
    return "\n".join(out) + "\n"


def summary(rows: Iterable[dict]) -> str:
    """The from-scratch cells, one line per setting (the README's table): per target DWF (its gap) / ModelPruning /
    PAT, seed means marked by their count (³: seeds 0–2; ²: a seed pass stopped half-way)."""

    def acc(runs: list[dict]) -> str:
        mean = mean_acc(runs)
        return "—" if mean is None else f"{100 * mean:.2f}" + {1: "", 2: "²", 3: "³"}.get(len(runs), f"({len(runs)})")

    lines: dict[tuple, dict[float, str]] = defaultdict(dict)
    for (dataset, model, opt, batch, start, epochs, target), by_method in table_cells(rows).items():
        if start != "scratch":
            continue
        g = gap(by_method)
        dwf = f"**{acc(by_method.get('dwf', []))}**" + ("" if g is None else f" ({g:+.2f})")
        lines[(dataset, model, opt, batch, epochs)][target] = " / ".join(
            [dwf, acc(by_method.get("model-pruning", [])), acc(by_method.get("pat", []))]
        )
    targets = sorted({t for by_target in lines.values() for t in by_target})
    out = [
        "| data | model | optimizer | batch | epochs | "
        + " | ".join(f"{100 * t:g} %: DWF / MP / PAT" for t in targets) + " |",
        "|---|---|---|---|---|" + "---|" * len(targets),
    ]
    for (dataset, model, opt, batch, epochs), by_target in lines.items():
        cols = [dataset, model, opt, str(batch), str(epochs), *(by_target.get(t, "—") for t in targets)]
        out.append("| " + " | ".join(cols) + " |")
    return "\n".join(out) + "\n"


def gap_plot(rows: Iterable[dict], path: Path) -> Path:
    """One dot per cell: DWF − best peer (points), from-scratch and from-pretrained cells in two colours."""
    points = [
        (f"{d} {m} {o} b{b} {e}ep {100 * t:g}%" + (" pre" if s == "pretrained" else ""), gap(bm), s)
        for (d, m, o, b, s, e, t), bm in table_cells(rows).items()
        if gap(bm) is not None
    ]
    colors = (("scratch", "tab:blue"), ("pretrained", "tab:orange"))
    groups = {start: (color, f"from {start}") for start, color in colors}
    return plots.dot_plot(
        points, groups, path, xlabel="DWF − best peer (accuracy points)", title="Generalization matrix, defaults only"
    )


def report(results: Path) -> tuple[Path, Path]:
    rows = list(load_rows(results).values())
    md = results.with_name(f"{results.stem}_table.md")
    md.write_text(
        table(rows) + "\n## From scratch, one line per setting\n\nDWF (DWF − best peer, points) / ModelPruning / PAT, "
        "test accuracy %; ³: mean of seeds 0–2.\n\n" + summary(rows)
    )
    return md, gap_plot(rows, results.with_name(f"{results.stem}_gap.png"))


# ----------------------------------------------------------------------------------------------------------------- CLI
def cell_arguments(parser: argparse.ArgumentParser, model: str, opt: str, results: Path) -> None:
    """The arguments that name one matrix cell (``--data``, ``--model``, ``--opt``, ``--bs``) and where its rows go
    (``--results``, ``--data-dir``): shared by the probes that run a matrix cell with one knob changed."""
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--model", default=model, choices=sorted({m for _, m in SETTINGS}))
    parser.add_argument("--opt", default=opt, choices=sorted(OPTIMIZERS))
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--results", type=Path, default=results)
    parser.add_argument("--data-dir", default=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", default=None, help="key=value,... over data, model, opt, bs, target, method, start, seed"
    )
    parser.add_argument(
        "--pass", dest="passes", choices=("1", "2", "all"), default="all", help="first pass, seed pass, or both"
    )
    parser.add_argument(
        "--report", action="store_true", help="write the table and the gap plot from the results, run nothing"
    )
    parser.add_argument("--list", action="store_true", help="print the plan and its estimated time, run nothing")
    parser.add_argument("--results", type=Path, default=PATH, help="the .jsonl results file (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="override every setting's epochs (smoke runs)")
    parser.add_argument(
        "--max-batches", type=int, default=None, help="train on this many batches per epoch (smoke runs)"
    )
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.report:
        for p in report(args.results):
            print(p)
        return
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    only = parse_only(args.only)
    first = [c for c in plan_first_pass(args.epochs, args.max_batches) if selected(c, only)]
    if args.list:
        for c in first:
            print(key(c))
        hours = sum(estimate_seconds(c) for c in first) / 3600
        print(f"{len(first)} first-pass runs, about {hours:.1f} h of training (seed pass: decided by the results)")
        return
    done = run_all(first, args.results, args.data_dir) if args.passes in ("1", "all") else load_rows(args.results)
    if args.passes in ("2", "all"):
        second = [c for c in plan_second_pass(done.values()) if selected(c, only)]
        run_all(second, args.results, args.data_dir)


if __name__ == "__main__":
    main()
