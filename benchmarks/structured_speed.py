"""Accuracy against measured CPU latency: dense, DWF (unstructured, dense and sparse kernels), structured DWF shrunk,
Torch-Pruning's regularized group pruning and ModelPruning's ``ln_structured``, at budgets of dense MACs.

    python -m benchmarks.structured_speed                          # the whole plan, appended to results/
    python -m benchmarks.structured_speed --models lenet300 cnn-bn --budgets 0.25 --opts adamw --epochs 3
    python -m benchmarks.structured_speed --report                 # table and plot from the rows so far

Every method trains the same network on the same data order for the same epochs (``Classifier``: SGD with momentum
0.9 at lr 0.1, or AdamW at lr 1e-3; cosine over every step; batch 256) and is then timed in this process against the
dense model trained with the same optimizer, back to back: ``torch.utils.benchmark`` medians at batch 1 and 64, test
images as input, ``torch.set_num_threads`` fixed and reported, ``inference_mode``, ``eval()``. MACs are per sample, of
the Conv and Linear layers (:func:`lightning_dwf.inference.count_macs_and_params`); a MACs ratio is not a speed-up.

* ``dense``: no sparsity.
* ``dwf``: ``DWFCallback(depth=3, target_sparsity=1 − budget)`` (unstructured, every Linear/Conv weight): its MACs are
  the dense ones; timed with dense kernels and after ``use_sparse_kernels_`` (CSR where measured faster).
* ``dwf-structured``: ``DWFCallback(depth=3, regime=BudgetConfig(budget), factorize=FactorizeConfig(structure=
  "outputs", or "heads" for the layers in ``HEADS``, include=SCOPE))``, collapsed and shrunk with ``shrink_`` (outputs
  checked equal).
* ``torch-pruning``: ``tp.pruner.GroupNormPruner`` (GroupMagnitudeImportance p=2, its README's recipe, uniform per-layer
  ratio; whole heads of the ``HEADS`` layers at the same ratio, ``prune_num_heads=True``) regularizing the same layers
  during the first half of the epochs, then pruned to the budget (the smallest uniform channel ratio whose MACs fit) and
  fine-tuned for the second half with a fresh cosine schedule.
* ``ln-structured``: Lightning's ``ModelPruning("ln_structured", pruning_dim=0, pruning_norm=2)`` on the same layers,
  gradually over the epochs to the per-layer amount whose MACs fit the budget; then the zero rows/filters are removed
  through the same dependency graph for timing (their bias and BatchNorm are not silent, so the accuracy is measured on
  the shrunk model). It prunes rows, layer by layer, so it cannot remove heads: in the ViT it gets the MLP only.

``SCOPE`` is the layers each structured method may shrink: every hidden Linear/Conv of LeNet-300-100, the BN CNN and
the width-2048 MLP; in the ViT the MLP's hidden neurons and the attention heads (q/k/v projections, ``HEADS``).
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import platform
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils import benchmark

from benchmarks.harness.fit import make_trainer, train_loader
from benchmarks.harness.measure import measure as measure_net
from benchmarks.harness.store import RESULTS, append_rows, read_rows, versions
from benchmarks.models import Classifier
from examples.data import ImageData, load_dataset
from lightning_dwf import BudgetConfig, CollapseConfig, DWFCallback, FactorizeConfig, shrink_
from lightning_dwf.inference import count_macs_and_params, use_sparse_kernels_
from lightning_dwf.inference.coupling import build_graph, channel_spaces, set_heads_, torch_pruning

OUT = RESULTS / "structured_speed.jsonl"
MODELS = ("lenet300", "cnn-bn", "vit", "mlp2048")
BUDGETS = (0.5, 0.25, 0.1)
OPTS = ("sgd", "adamw")
LR = {"sgd": 0.1, "adamw": 1e-3}
SCOPE = {
    "lenet300": ["net.1", "net.3"],
    "mlp2048": ["net.1", "net.3"],
    "cnn-bn": ["net.0", "net.4", "net.9"],
    "vit": ["net.blocks.*.mlp.0", "net.blocks.*.attn.[qkv]"],
    "vit-mha": ["net.blocks.layers.*.linear1", "net.blocks.layers.*.self_attn"],
}
#: Scoped layers gated and pruned by whole attention heads (their head count): q/k/v projections, or the packed one of
#: ``nn.MultiheadAttention`` (``vit-mha``; DWF only: the peers' head pruning is not set up for it).
HEADS = {"vit": {"net.blocks.*.attn.[qkv]": 4}, "vit-mha": {"net.blocks.layers.*.self_attn": 4}}
BATCHES = (1, 64)
BATCH_SIZE = 256
#: ``use_sparse_kernels_``'s measuring time per layer and batch size (s).
KERNEL_RUN_TIME = 0.2
#: Bisection steps of the peers' search for the channel fraction that fits a budget, after the grid (the last step's
#: precision: 2^-steps of a grid step).
BISECTION_STEPS = 12
#: The uniform channel ratios a peer's budget search tries in order before it bisects (:func:`smallest_fitting_ratio`).
RATIO_GRID = (*(i / 20 for i in range(1, 20)), 0.99)


def in_scope(name: str, model: str, rows_only: bool = False) -> bool:
    """Whether layer ``name`` may be shrunk (``rows_only``: by rows, not as attention heads)."""
    heads = HEADS.get(model, {})
    return any(fnmatch.fnmatchcase(name, p) for p in SCOPE[model] if not (rows_only and p in heads))


def structure(model: str) -> FactorizeConfig:
    """The structured DWF selection: outputs of the scoped layers, heads of those in ``HEADS``."""
    heads = HEADS.get(model, {})
    return FactorizeConfig(structure={p: "heads" if p in heads else "outputs" for p in SCOPE[model]},
                           num_heads=max(heads.values(), default=None), include=SCOPE[model])


def scoped_layers(net: nn.Module, model: str, prefix: str = "net.", rows_only: bool = False) -> list[nn.Module]:
    return [m for n, m in net.named_modules(prefix=prefix.rstrip(".")) if in_scope(n, model, rows_only)]


def latency(net: nn.Module, x: torch.Tensor, min_run_time: float) -> float:
    """Median seconds per forward of ``net`` on ``x`` (``torch.utils.benchmark``, inference mode)."""
    net.eval()
    with torch.inference_mode():
        return benchmark.Timer("net(x)", globals={"net": net, "x": x}).blocked_autorange(
            min_run_time=min_run_time).median


def cost(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    macs, params = count_macs_and_params(net, x)
    return {"macs": macs, "params": params}


def new_module(cfg: dict, data: ImageData) -> Classifier:
    """``cfg``'s model with its optimizer's LR, freshly initialized from ``cfg["seed"]``."""
    seed_everything(cfg["seed"], verbose=False)
    return Classifier(cfg["model"], lr=LR[cfg["opt"]], optimizer=cfg["opt"], num_classes=data.num_classes,
                      fused=cfg.get("fused", False))


def fit(cfg: dict, data: ImageData, callbacks: list[Callback], module: Classifier | None = None,
        epochs: int | None = None, **trainer: Any) -> tuple[Classifier, float]:
    """Train ``cfg``'s model (or ``module``) with ``callbacks``; returns it and the seconds ``Trainer.fit`` took
    (``trainer``: further Trainer arguments, e.g. a logger)."""
    if module is None:
        module = new_module(cfg, data)
    else:
        seed_everything(cfg["seed"], verbose=False)
    start = time.perf_counter()
    make_trainer(epochs or cfg["epochs"], callbacks, **trainer).fit(
        module, train_loader(data, cfg.get("batch", BATCH_SIZE), cfg["seed"]))
    return module, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------- peers' budgets
def uniform_amount(net: nn.Module, model: str, x: torch.Tensor, budget: float) -> float:
    """The largest per-layer fraction of channels to remove from every row-scoped layer whose shrunk MACs fit
    ``budget`` (bisection on a copy whose scoped rows are zeroed, gated through BatchNorm where one follows).

    Raises:
        ValueError: no fraction fits the budget.
    """
    dense = cost(net, x)["macs"]

    def macs_at(amount: float) -> float:
        trial = copy.deepcopy(net).eval()
        silence(trial, model, amount)
        shrink_(trial, x, atol=float("inf"))
        return cost(trial, x)["macs"]

    return smallest_fitting_ratio(lambda amount: macs_at(amount) <= budget * dense,
                                  f"row pruning of {model} cannot reach {budget:.0%} of dense MACs")


def smallest_fitting_ratio(fits: Callable[[float], bool], refusal: str) -> float:
    """The smallest channel ratio in (0, 0.99] for which ``fits`` holds: the first of :data:`RATIO_GRID` that fits,
    then ``BISECTION_STEPS`` halvings of the step below it. The grid comes first because a uniform ratio's cost need
    not fall monotonically near 1 (Torch-Pruning skips a layer that the ratio would leave with no channel: on the BN
    CNN its cost at 0.95 and 0.99 was above its cost at 0.9).

    Raises:
        ValueError: ``refusal``, when no ratio of the grid fits.
    """
    low = 0.0
    for high in RATIO_GRID:
        if fits(high):
            break
        low = high
    else:
        raise ValueError(refusal)
    for _ in range(BISECTION_STEPS):
        mid = (low + high) / 2
        if fits(mid):
            high = mid
        else:
            low = mid
    return high


@torch.no_grad()
def silence(net: nn.Module, model: str, amount: float) -> None:
    """Zero the first ``round(amount · n)`` output channels of every scoped layer, bias and following BatchNorm too."""
    mods = list(net.named_modules(prefix="net"))
    for i, (name, m) in enumerate(mods):
        if isinstance(m, (nn.Linear, nn.Conv2d)) and in_scope(name, model, rows_only=True):
            k = round(amount * m.weight.shape[0])
            m.weight[:k] = 0
            if m.bias is not None:
                m.bias[:k] = 0
            nxt = mods[i + 1][1] if i + 1 < len(mods) else None
            if isinstance(nxt, nn.BatchNorm2d):
                nxt.weight[:k] = 0
                nxt.bias[:k] = 0


def force_shrink(net: nn.Module, x: torch.Tensor) -> None:
    """Remove every channel whose weight rows are zero in all the layers that write it, ignoring their bias and
    BatchNorm shift (ModelPruning's masks leave those): the model a user of the peer would deploy."""
    dg = build_graph(net, x)
    for space in channel_spaces(dg):
        silent = torch.ones(space.size, dtype=torch.bool)
        for module, positions in space.outputs:
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                rows = module.weight.detach().reshape(module.weight.shape[0], -1)
                silent &= (rows[positions] == 0).all(dim=1)
        idxs = space.removable_where(silent)
        if idxs:
            group = dg.get_pruning_group(space.root, space.handler, idxs)
            if dg.check_pruning_group(group):
                group.prune()
                set_heads_(net, space.heads_left(len(idxs)))


class Regularize(Callback):
    """Torch-Pruning's sparse training: ``pruner.regularize(model)`` after every backward (before the step)."""

    def __init__(self, pruner: Any) -> None:
        self.pruner = pruner

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.pruner.regularize(pl_module.net)


def torch_pruning_run(cfg: dict, data: ImageData, x: torch.Tensor) -> tuple[nn.Module, float]:
    tp = torch_pruning()
    module = new_module(cfg, data)
    net = module.net
    ignored = [n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
               and not in_scope(f"net.{n}", cfg["model"])]
    heads = {n: h for n, _ in net.named_modules() for p, h in HEADS.get(cfg["model"], {}).items()
             if fnmatch.fnmatchcase(f"net.{n}", p)}

    def pruner_for(target: nn.Module, ratio: float) -> Any:
        mods = dict(target.named_modules())
        return tp.pruner.GroupNormPruner(
            target, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=ratio,
            ignored_layers=[mods[n] for n in ignored], reg=cfg.get("tp_reg", 5e-4),
            num_heads={mods[n]: h for n, h in heads.items()}, prune_num_heads=bool(heads), prune_head_dims=False,
            # at least one head stays (a ratio that rounds to all of them sets the head count to 0, widths unchanged)
            head_pruning_ratio=min(ratio, 1 - 1 / max(heads.values(), default=1)))

    pruner = pruner_for(net, 0.5)
    first = max(cfg["epochs"] // 2, 1)
    _, t1 = fit(cfg, data, [Regularize(pruner)], module=module, epochs=first)
    dense = cost(net, x)["macs"]

    def pruned(ratio: float) -> nn.Module:
        trial = copy.deepcopy(net).eval()
        pruner = pruner_for(trial, ratio)
        pruner.step()
        for n in heads:  # Torch-Pruning's recipe: the attention module takes the new head count
            owner = trial.get_submodule(n.rpartition(".")[0])
            owner.heads = pruner.num_heads[trial.get_submodule(n)]
        return trial

    ratio = smallest_fitting_ratio(lambda r: cost(pruned(r), x)["macs"] <= cfg["budget"] * dense,
                                   f"Torch-Pruning cannot reach {cfg['budget']:.0%} of dense MACs on {cfg['model']}")
    module.net = pruned(ratio).train()
    _, t2 = fit(cfg, data, [], module=module, epochs=cfg["epochs"] - first)
    return module.net, t1 + t2


def ln_structured_run(cfg: dict, data: ImageData, x: torch.Tensor) -> tuple[nn.Module, float]:
    probe = Classifier(cfg["model"], num_classes=data.num_classes).net
    amount = uniform_amount(probe, cfg["model"], x, cfg["budget"])
    module = new_module(cfg, data)
    layers = [(m, "weight") for m in scoped_layers(module.net, cfg["model"], rows_only=True)]
    ramp = max(cfg["epochs"] - 1, 1)  # prune at the end of each epoch but the last, which fine-tunes
    steps = [1 - (1 - amount) ** ((e + 1) / ramp) for e in range(ramp)]  # the same fraction of what is left each time

    def per_epoch(epoch: int) -> float:  # ModelPruning applies amounts of what is left
        if epoch >= ramp:
            return 0.0
        done = steps[epoch - 1] if epoch else 0.0
        return (steps[epoch] - done) / (1 - done)

    pruning = ModelPruning("ln_structured", parameters_to_prune=layers, amount=per_epoch, pruning_dim=0,
                           pruning_norm=2, make_pruning_permanent=True, use_global_unstructured=False, verbose=0)
    module, seconds = fit(cfg, data, [pruning], module=module)
    net = module.net.eval()
    force_shrink(net, x)
    return net, seconds


# ----------------------------------------------------------------------------------------------------------- the plan
def train_cell(cfg: dict, data: ImageData, dense: dict[str, nn.Module]) -> tuple[dict, dict[str, nn.Module]]:
    """Train one method; returns its row (without timings) and the nets to time (by label)."""
    x = data.test_x[:2]
    method = cfg["method"]
    extra: dict[str, Any] = {}
    nets: dict[str, nn.Module] = {}
    if method == "dense":
        module, seconds = fit(cfg, data, [])
        net = module.net.eval()
        dense[cfg["opt"]] = net
    elif method == "dwf":
        dwf = DWFCallback(depth=3, target_sparsity=1 - cfg["budget"], collapse=CollapseConfig(save=False))
        module, seconds = fit(cfg, data, [dwf])
        net = module.net.eval()
        kernels = copy.deepcopy(net)
        report = use_sparse_kernels_(kernels, batch_sizes=BATCHES, min_run_time=KERNEL_RUN_TIME)
        nets["csr"] = kernels
        extra["csr_layers"] = list(report.swapped)
        extra["sparsity"] = measure_net(net, data)["sparsity"]
    elif method == "dwf-structured":
        dwf = DWFCallback(depth=3, regime=BudgetConfig(cfg["budget"], example_inputs=x),
                          factorize=structure(cfg["model"]),
                          collapse=CollapseConfig(save=False))
        module, seconds = fit(cfg, data, [dwf])
        net = module.net.eval()
        extra["acc_collapsed"] = measure_net(net, data)["acc"]
        report = shrink_(net, x)
        extra["shrink_max_abs_diff"] = report.max_abs_diff
    elif method == "torch-pruning":
        net, seconds = torch_pruning_run(cfg, data, x)
    elif method == "ln-structured":
        net, seconds = ln_structured_run(cfg, data, x)
    else:
        raise ValueError(method)
    if not all(bool(torch.isfinite(p).all()) for p in net.parameters()):
        raise ValueError(f"{method} diverged: non-finite weights after training")
    net.eval()
    nets["main"] = net
    reference = dense[cfg["opt"]]
    row = dict(cfg, acc=measure_net(net, data)["acc"], train_s=seconds, **cost(net, x),
               dense_macs=cost(reference, x)["macs"], dense_params=cost(reference, x)["params"], **extra)
    return row, nets


def time_group(rows: list[dict], nets: list[dict[str, nn.Module]], dense: nn.Module, data: ImageData,
               min_run_time: float, rounds: int = 3) -> None:
    """Time every net of one (model, optimizer) and the dense one round-robin, ``rounds`` times, and put the medians
    and speed-ups into the rows: interleaving spreads any background load over all of them alike."""
    for b in BATCHES:
        x = data.test_x[:b]
        samples: dict[tuple[int, str], list[float]] = {}
        for _ in range(rounds):
            samples.setdefault((-1, "dense"), []).append(latency(dense, x, min_run_time))
            for i, group in enumerate(nets):
                for label, net in group.items():
                    samples.setdefault((i, label), []).append(latency(net, x, min_run_time))
        t_dense = sorted(samples[(-1, "dense")])[rounds // 2]
        for i, row in enumerate(rows):
            for label in nets[i]:
                t = sorted(samples[(i, label)])[rounds // 2]
                prefix = "" if label == "main" else f"{label}_"
                row |= {f"{prefix}dense_us_b{b}": t_dense * 1e6, f"{prefix}us_b{b}": t * 1e6,
                        f"{prefix}speedup_b{b}": t_dense / t}


def plan(models: list[str], budgets: list[float], opts: list[str], methods: list[str], epochs: int,
         seed: int) -> list[dict]:
    cells = []
    for model in models:
        for opt in opts:
            cells.append(dict(model=model, opt=opt, method="dense", budget=1.0, epochs=epochs, seed=seed))
            for budget in budgets:
                cells += [dict(model=model, opt=opt, method=m, budget=budget, epochs=epochs, seed=seed)
                          for m in methods]
    return cells


def key(row: dict) -> tuple:
    return (row["model"], row["opt"], row["method"], row["budget"], row["epochs"], row["seed"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--opts", nargs="+", default=list(OPTS))
    parser.add_argument("--methods", nargs="+",
                        default=["dwf-structured", "torch-pruning", "ln-structured", "dwf"])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--report", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT, help="rows file (the report goes beside it)")
    args = parser.parse_args()
    out = args.out
    if not args.report:
        torch.set_num_threads(args.threads)
        data = load_dataset("auto")
        done = {key(r) for r in read_rows(out)} if out.exists() else set()
        cells = plan(args.models, args.budgets, args.opts, args.methods, args.epochs, args.seed)
        for group_key in dict.fromkeys((c["model"], c["opt"]) for c in cells):
            todo = [c for c in cells if (c["model"], c["opt"]) == group_key and key(c) not in done]
            if not todo:
                continue
            dense: dict[str, nn.Module] = {}
            rows, nets = [], []
            for cfg in [c for c in cells if (c["model"], c["opt"]) == group_key and c["method"] == "dense"] + [
                    c for c in todo if c["method"] != "dense"]:
                try:
                    row, made = train_cell(cfg, data, dense)
                except (ValueError, MisconfigurationException) as err:  # e.g. a budget the scope cannot reach
                    print(f"{key(cfg)}: {err}", flush=True)
                    append_rows(out, [dict(cfg, error=str(err))])
                    continue
                rows.append(row)
                nets.append(made)
            time_group(rows, nets, dense[group_key[1]], data, args.min_run_time)
            meta = dict(threads=torch.get_num_threads(), machine=platform.processor() or platform.machine(),
                        dataset=data.name, versions=versions(["torch", "lightning", "torch-pruning"]))
            new_rows = [row | meta for row in rows if key(row) not in done]
            append_rows(out, new_rows)
            done |= {key(r) for r in new_rows}
            for row in new_rows:
                print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (dict, list))}), flush=True)
    write_report(out)


def fmt(runs: list[dict]) -> str:
    """One cell: mean test accuracy over the seeds run that reached the budget (³: three seeds), MACs / dense, speed-ups
    at batch 1 / 64, and how many seeds did not reach it or diverged; "unreachable" or "diverged" when none did."""
    if not runs:
        return "—"
    reached = [r for r in runs if "error" not in r]
    failures = Counter("diverged" if "diverged" in r["error"] else "unreachable" for r in runs if "error" in r)
    if not reached:
        return " / ".join(failures)
    mean = lambda key: sum(r[key] for r in reached) / len(reached)  # noqa: E731
    mark = "" if len(reached) == 1 else ("³" if len(reached) == 3 else f" ({len(reached)} seeds)")
    missed = (" (" + ", ".join(f"{why} in {n}" for why, n in failures.items()) + f" of {len(runs)} seeds)"
              if failures else "")
    return (f"{mean('acc'):.2%}{mark}{missed} · {mean('macs') / mean('dense_macs'):.2f} MACs · "
            f"{mean('speedup_b1'):.2f}× / {mean('speedup_b64'):.2f}×")


def write_report(out: Path = OUT) -> None:
    rows = read_rows(out) if out.exists() else []
    if not rows:
        return
    methods = ["dense", "dwf", "dwf-structured", "torch-pruning", "ln-structured"]
    first = rows[0]
    lines = [
        f"Structured sparsity and measured CPU latency on {first.get('dataset')}, {first.get('epochs')} epochs, seed "
        f"{first.get('seed')}, batch {BATCH_SIZE}, {first.get('threads')} threads, {first.get('machine')}; torch "
        f"{first['versions'].get('torch')}. Each cell: test accuracy (seed 0, or ³ the mean of seeds 0–2 where "
        "structured DWF and Torch-Pruning were within 0.5 points) · MACs / dense · measured speed-up over dense at "
        "batch 1 / batch 64 (median latency, timed back to back in one process). `dwf` keeps dense MACs; its "
        "sparse-kernel speed-up is in the last column. Produced by `python -m benchmarks.structured_speed`.",
        "",
        "| model | opt | budget | " + " | ".join(methods) + " | dwf on CSR (b1 / b64) |",
        "|---|---|---|" + "---|" * len(methods) + "---|",
    ]
    index: dict[tuple, list[dict]] = {}
    for r in rows:
        index.setdefault((r["model"], r["opt"], r["method"], r["budget"]), []).append(r)
    for model in dict.fromkeys(r["model"] for r in rows):
        for opt in dict.fromkeys(r["opt"] for r in rows if r["model"] == model):
            budgets = sorted({r["budget"] for r in rows if r["model"] == model and r["budget"] < 1}, reverse=True)
            for budget in budgets:
                cells = [fmt([r for r in index.get((model, opt, m, 1.0 if m == "dense" else budget), [])
                              if m != "dense" or r["seed"] == 0]) for m in methods]
                unstructured = next(iter(index.get((model, opt, "dwf", budget), [])), None)
                csr = (f"{unstructured['csr_speedup_b1']:.2f}× / {unstructured['csr_speedup_b64']:.2f}×"
                       if unstructured and "csr_speedup_b1" in unstructured else "—")
                lines.append(f"| {model} | {opt} | {budget:.0%} | " + " | ".join(cells) + f" | {csr} |")
    train = [r for r in rows if r["method"] in ("dense", "dwf-structured") and "train_s" in r and r["seed"] == 0]
    def label(r: dict) -> str:
        return r["method"] if r["method"] == "dense" else f"{r['method']} {r['budget']:.0%}"

    lines += ["", "Train time (s, whole fit, batch 256): " + "; ".join(
        f"{r['model']} {r['opt']} {label(r)} {r['train_s']:.0f}" for r in train)]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    from benchmarks.harness.plots import pyplot, save

    plt = pyplot()
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3.6), squeeze=False)
    marks = {"dense": "k*", "dwf": "C0o", "dwf-structured": "C3s", "torch-pruning": "C2^", "ln-structured": "C1v"}
    for ax, model in zip(axes[0], models, strict=True):
        for method, mark in marks.items():
            pts = [(r["us_b64"] / 1e3, r["acc"] * 100) for r in rows
                   if r["model"] == model and r["method"] == method and "acc" in r]
            if pts:
                ax.plot(*zip(*pts, strict=True), mark, label=method, alpha=0.8)
        ax.set_title(model)
        ax.set_xlabel("latency at batch 64 (ms)")
        ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    save(fig, path)


if __name__ == "__main__":
    main()
