"""Accuracy vs compression on real data: dense, DWF (D = 2, 3, 4) over a λ grid, Lightning's ModelPruning
(gradual global L1) and one-shot magnitude pruning (with and without fine-tuning), at the same epochs,
batch size and data order.

    python -m benchmarks.sweep --quick      # about 5 minutes on 2 CPU cores
    python -m benchmarks.sweep              # the full sweep, about an hour
    python -m benchmarks.report             # table + plots from the results file

One JSON row per run (full config + results) is appended to ``benchmarks/results/<mode>.jsonl``;
runs already there are skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelPruning
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.models import Classifier, accuracy
from examples.data import ImageData, load_dataset
from lightning_dwf import (
    DEFAULT_LAYER_TYPES,
    DEFAULT_THRESHOLD,
    CollapseConfig,
    DWFCallback,
    DWFDivergenceError,
    FactorizeConfig,
    FactorLRConfig,
    QuantizeConfig,
    ScheduleConfig,
    sparsity_report,
)
from lightning_dwf.core.functional import lam_floor
from lightning_dwf.training.controller import default_recovery

RESULTS = Path(__file__).parent / "results"
TARGETS = (0.9, 0.95, 0.98, 0.99, 0.995)
#: λ grid as multiples of the LR-floor λ (the smallest λ that lets unsupported weights reach the threshold in time).
LAM_MULTIPLES = (0.5, 1, 2, 4, 8, 16)

MODES: dict[str, dict[str, Any]] = {
    "quick": dict(
        datasets=["fashion-mnist"],
        models=["lenet300"],
        depths=[2, 3],
        lam_multiples={"default": (1, 3, 9)},
        targets=(0.95, 0.99),
        epochs={"fashion-mnist": {"lenet300": 5}},
        finetune_epochs=1,
        target_runs={("fashion-mnist", "lenet300"): (3,)},
    ),
    "full": dict(
        datasets=["fashion-mnist", "mnist-subset"],
        models=["lenet300", "lenet5", "cnn-bn"],
        depths=[2, 3, 4],
        # the full grid where the bar is set (Fashion-MNIST LeNet-300-100), a coarser one elsewhere to fit the hour
        lam_multiples={("fashion-mnist", "lenet300"): LAM_MULTIPLES, "default": (1, 2, 4, 8)},
        targets=TARGETS,
        epochs={
            "fashion-mnist": {"lenet300": 20, "lenet5": 6, "cnn-bn": 4},
            "mnist-subset": {"lenet300": 30, "lenet5": 20, "cnn-bn": 8},
        },
        finetune_epochs=2,
        target_runs={("fashion-mnist", "lenet300"): (2, 3, 4), ("fashion-mnist", "cnn-bn"): (2, 3)},
        # extra seeds where the bar is set, for these targets
        repeat={("fashion-mnist", "lenet300"): ((1, 2), TARGETS), ("fashion-mnist", "cnn-bn"): ((1, 2), TARGETS)},
    ),
}
BATCH_SIZE = {"fashion-mnist": 256, "mnist": 256, "mnist-subset": 64}
LR, MOMENTUM, FINETUNE_LR, SEED = 0.1, 0.9, 0.01, 0
#: Where and in what precision the sweep trains; a probe row that differs carries the key (sweep rows never do).
DEVICE_DEFAULTS = dict(accelerator="cpu", precision="32-true")
#: factor_lr_multiplier per (dataset, model): 10 (effective factor LR 10 at lr 0.1, momentum 0.9), ramped up over the
# first
#: 10 % of the run, where it was tuned (README: 1, 2, 5, 7 lose accuracy; 14 and 20 diverge without the ramp); the
#: settings not retuned keep the first sweep's 5 without a ramp.
FACTOR_LR_MULTIPLIER = {("fashion-mnist", "lenet300"): 10.0, ("fashion-mnist", "cnn-bn"): 10.0, "default": 5.0}
FACTOR_LR_WARMUP = {("fashion-mnist", "lenet300"): 0.1, ("fashion-mnist", "cnn-bn"): 0.1, "default": 0.0}
#: Marks target-mode rows (sweep and probe) run since the factor LR warm-up is repeated at the recovery point; older
# rows
#: lack it, so the sweep retires them.
TARGET_RECIPE = dict(recovery_lr_warmup=True)


def floor_lam(steps: int, multiplier: float, init_std: float = 0.05) -> float:
    """λ at which the effective factor LR (lr × multiplier / (1 − momentum)) is exactly the LR floor."""
    return lam_floor(LR * multiplier / (1 - MOMENTUM), steps, init_std, DEFAULT_THRESHOLD)


def loader(data: ImageData, batch_size: int, seed: int = SEED) -> DataLoader:
    g = torch.Generator().manual_seed(seed)  # the same data order for every method (per seed)
    return DataLoader(TensorDataset(data.train_x, data.train_y), batch_size=batch_size, shuffle=True, generator=g)


def trainer(epochs: int, callbacks: list, cfg: dict | None = None, **overrides: Any) -> Trainer:
    """The Trainer every method runs in: ``cfg``'s accelerator/precision if it names them, else
    :data:`DEVICE_DEFAULTS`; ``overrides`` are further Trainer arguments (e.g. ``limit_train_batches``)."""
    device = {k: (cfg or {}).get(k, v) for k, v in DEVICE_DEFAULTS.items()}
    return Trainer(
        devices=1,
        max_epochs=epochs,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **device,
        **overrides,
    )


def prunable(net: nn.Module) -> list[tuple[nn.Module, str]]:
    """The weights every method sparsifies and counts: Linear and Conv weights (DWF's default selection)."""
    return [(m, "weight") for m in net.modules() if isinstance(m, DEFAULT_LAYER_TYPES)]


def gradual_amounts(target: float, epochs: int) -> list[float]:
    """Per-epoch fractions of the *remaining* weights to prune so that sparsity follows the cubic schedule of
    Zhu & Gupta (2017) to ``target`` at 70 % of training, then stays (fine-tuning for the rest)."""
    prune_epochs = max(1, math.ceil(0.7 * epochs))
    amounts, previous = [], 0.0
    for k in range(1, prune_epochs + 1):
        current = target * (1 - (1 - k / prune_epochs) ** 3)
        amounts.append(1 - (1 - current) / (1 - previous))
        previous = current
    return amounts + [0.0] * (epochs - prune_epochs)


class _Amount:
    """Picklable ``amount(epoch)`` for ModelPruning."""

    def __init__(self, amounts: list[float]) -> None:
        self.amounts = amounts

    def __call__(self, epoch: int) -> float:
        return self.amounts[epoch] if epoch < len(self.amounts) else 0.0


class LayerPruning(ModelPruning):
    """Lightning's ModelPruning restricted to the Linear/Conv weights (not BatchNorm scales), like the other methods."""

    def filter_parameters_to_prune(self, parameters_to_prune):
        return [(m, n) for m, n in parameters_to_prune if isinstance(m, DEFAULT_LAYER_TYPES)]


def measure(net: nn.Module, data: ImageData) -> dict[str, float]:
    report = sparsity_report(net, threshold=0.0)
    return dict(
        acc=accuracy(net, data.test_x, data.test_y),
        compression_ratio=report.compression_ratio,
        sparsity=report.sparsity,
        nonzero=report.nonzero,
        numel=report.numel,
    )


def run_training(cfg: dict, data: ImageData, callbacks: list) -> tuple[Classifier, float]:
    seed = cfg.get("seed", SEED)
    seed_everything(seed, verbose=False)
    module = Classifier(cfg["model"], lr=LR, momentum=MOMENTUM, num_classes=data.num_classes)
    start = time.perf_counter()
    trainer(cfg["epochs"], callbacks, cfg).fit(module, loader(data, cfg["batch_size"], seed))
    return module, time.perf_counter() - start


def defaults_callback(
    depth: int,
    target: float | None = None,
    init: str = "dwf",
    lam: float | None = None,
    multiplier: float | None = None,
) -> DWFCallback:
    """DWF as a user adds it: ``DWFCallback(depth=D, target_sparsity=T)`` (or ``lam=λ``) and nothing else
    (``init="balanced"`` to start from a trained net; ``multiplier``: one factor LR multiplier for every tensor instead
    of ``"auto"``, for :mod:`benchmarks.factor_lr`); ``save=False`` and ``verbose=False`` only silence the collapsed
    file and the messages."""
    extra: dict[str, Any] = dict(factorize=FactorizeConfig(init=init)) if init != "dwf" else {}
    if multiplier is not None:
        extra["factor_lr"] = FactorLRConfig(multiplier=multiplier)
    knob: dict[str, Any] = dict(lam=lam) if lam is not None else dict(target_sparsity=target)
    return DWFCallback(depth=depth, collapse=CollapseConfig(save=False), verbose=False, **knob, **extra)


def method_callbacks(cfg: dict, schedule: ScheduleConfig | None = None) -> list:
    """The callback that makes ``cfg["method"]`` (DWF fixed λ or target, or ModelPruning) out of a plain training run
    (none: dense). A row with ``recipe="defaults"`` gets :func:`defaults_callback`; otherwise ``schedule`` overrides
    target mode's schedule settings (gain, step bound) and the row's ``recovery``, ``control_threshold`` and factor
    LR settings are set on the callback."""
    if cfg["method"] == "dense":
        return []
    if cfg["method"] == "model-pruning":
        return [
            LayerPruning(
                "l1_unstructured",
                parameter_names=["weight"],
                use_global_unstructured=True,
                amount=_Amount(gradual_amounts(cfg["target"], cfg["epochs"])),
                make_pruning_permanent=True,
                use_lottery_ticket_hypothesis=False,
                verbose=0,
            )
        ]
    if cfg.get("recipe") == "defaults":
        return [defaults_callback(cfg["depth"], cfg["target"], cfg.get("init", "dwf"))]
    control = cfg.get("control_threshold")
    if "target" in cfg:
        schedule = replace(
            schedule or ScheduleConfig(),
            recovery=cfg["recovery"],
            control_threshold=None if control == "auto" else control,
        )
        knob: dict[str, Any] = dict(target_sparsity=cfg["target"], schedule=schedule)
        collapse = CollapseConfig(save=False)
    else:
        knob = dict(lam=cfg["lam"])
        collapse = CollapseConfig(threshold=cfg.get("threshold", DEFAULT_THRESHOLD), save=False)
    factor_lr = FactorLRConfig(
        multiplier=cfg["factor_lr_multiplier"], warmup=cfg.get("factor_lr_warmup", 0.0), check="off"
    )
    return [
        DWFCallback(
            depth=cfg["depth"],
            factorize=FactorizeConfig(init=cfg.get("init", "dwf")),
            factor_lr=factor_lr,
            collapse=collapse,
            quantize=QuantizeConfig(cfg["quantize_bits"], cfg.get("quantize_fraction", 0.2))
            if cfg.get("quantize_bits") else None,
            verbose=False,
            **knob,
        )
    ]


def train_and_measure(cfg: dict, data: ImageData, callbacks: list) -> dict[str, Any]:
    """Train, then test the (collapsed) net; a run DWFCallback stopped on NaN/Inf factors is recorded as diverged."""
    try:
        module, seconds = run_training(cfg, data, callbacks)
    except DWFDivergenceError as err:
        return dict(acc=None, compression_ratio=None, diverged=str(err).split(". ")[0])
    results = dict(measure(module.net, data), train_seconds=seconds)
    for cb in callbacks:  # record the control threshold target mode used (its default depends on the run)
        if isinstance(cb, DWFCallback) and cb.control_threshold:
            results["control_threshold"] = cb.control_threshold
    return results


def oneshot(dense_net: nn.Module, cfg: dict, data: ImageData) -> tuple[dict, dict]:
    """Global L1 magnitude pruning of the trained dense net to ``target``, then a short fine-tune with masks kept."""
    pruned = copy.deepcopy(dense_net)
    prune.global_unstructured(prunable(pruned), pruning_method=prune.L1Unstructured, amount=cfg["target"])
    for m, name in prunable(pruned):
        prune.remove(m, name)
    no_ft = measure(pruned, data)
    net = copy.deepcopy(dense_net)  # the same (deterministic) pruning, with masks kept through fine-tuning
    prune.global_unstructured(prunable(net), pruning_method=prune.L1Unstructured, amount=cfg["target"])
    module = Classifier(cfg["model"], lr=FINETUNE_LR, momentum=MOMENTUM, num_classes=data.num_classes)
    module.net = net
    seed_everything(SEED, verbose=False)
    start = time.perf_counter()
    trainer(cfg["finetune_epochs"], [], cfg).fit(module, loader(data, cfg["batch_size"]))
    for m, name in prunable(net):
        prune.remove(m, name)
    return no_ft, dict(measure(net, data), train_seconds=time.perf_counter() - start)


def configs(mode: str, dataset: str, model: str, data: ImageData) -> list[dict]:
    spec = MODES[mode]
    epochs, batch_size = spec["epochs"][dataset][model], BATCH_SIZE[dataset]
    steps = epochs * math.ceil(len(data.train_y) / batch_size)
    base = dict(
        mode=mode,
        dataset=dataset,
        model=model,
        epochs=epochs,
        batch_size=batch_size,
        lr=LR,
        momentum=MOMENTUM,
        seed=SEED,
    )
    out = [dict(base, method="dense")]
    mult = FACTOR_LR_MULTIPLIER.get((dataset, model), FACTOR_LR_MULTIPLIER["default"])
    factor_lr = dict(factor_lr_multiplier=mult)
    warmup = FACTOR_LR_WARMUP.get((dataset, model), FACTOR_LR_WARMUP["default"])
    if warmup:
        factor_lr["factor_lr_warmup"] = warmup
    lam0 = floor_lam(steps, mult)
    for depth in spec["depths"]:
        for k in spec["lam_multiples"].get((dataset, model), spec["lam_multiples"]["default"]):
            out.append(
                dict(
                    base,
                    method=f"dwf-d{depth}",
                    depth=depth,
                    lam=float(f"{lam0 * k:.3g}"),
                    threshold=DEFAULT_THRESHOLD,
                    **factor_lr,
                )
            )
    for depth in spec["target_runs"].get((dataset, model), ()):
        for target in spec["targets"]:
            out.append(
                dict(
                    base,
                    method=f"dwf-target-d{depth}",
                    depth=depth,
                    target=target,
                    recovery=default_recovery(target),
                    control_threshold="auto",
                    **TARGET_RECIPE,
                    **factor_lr,
                )
            )
    for target in spec["targets"]:
        out.append(dict(base, method="model-pruning", target=target))
        out.append(dict(base, method="oneshot", target=target, finetune_epochs=0))
        out.append(
            dict(
                base,
                method="oneshot-ft",
                target=target,
                finetune_epochs=spec["finetune_epochs"],
                finetune_lr=FINETUNE_LR,
            )
        )
    # repeats with other seeds (init and data order) where the bar is set, for the methods it compares
    repeat = spec.get("repeat", {}).get((dataset, model))
    if repeat:
        seeds, targets = repeat
        out += [
            dict(cfg, seed=seed)
            for seed in seeds
            for cfg in list(out)
            if cfg.get("target") in targets
            and (cfg["method"] == "model-pruning" or cfg["method"].startswith("dwf-target"))
        ]
    return out


def key(cfg: dict) -> str:
    return json.dumps(cfg, sort_keys=True)


def retire_stale(path: Path, done: dict[str, dict], dataset: str, model: str, current: set[str]) -> None:
    """Move rows of ``dataset``/``model`` that the sweep no longer defines (an older recipe) to
    ``<mode>_superseded.jsonl``.

    Keeps the results file equal to what the current code would produce; the old rows stay on record.
    """
    stale = [
        k
        for k, row in done.items()
        if (row["config"]["dataset"], row["config"]["model"]) == (dataset, model) and k not in current
    ]
    if not stale:
        return
    with path.with_name(f"{path.stem}_superseded.jsonl").open("a") as f:
        for k in stale:
            f.write(json.dumps(done.pop(k)) + "\n")
    path.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
    print(f"{dataset} {model}: {len(stale)} rows of an older recipe moved to {path.stem}_superseded.jsonl", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one dataset/model, small grid (about 5 minutes)")
    parser.add_argument("--datasets", nargs="*", help="restrict to these datasets")
    parser.add_argument("--models", nargs="*", help="restrict to these models")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    mode = "quick" if args.quick else "full"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{mode}.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[key(row["config"])] = row
    versions = dict(torch=torch.__version__, lightning=lightning.__version__)
    for dataset in args.datasets or MODES[mode]["datasets"]:
        data = load_dataset(dataset, args.data_dir)
        for model in args.models or MODES[mode]["models"]:
            dense_net = None
            planned = configs(mode, dataset, model, data)
            retire_stale(path, done, dataset, model, {key(cfg) for cfg in planned})
            todo = [cfg for cfg in planned if key(cfg) not in done]
            needs_dense = any(cfg["method"].startswith("oneshot") for cfg in todo)
            for cfg in planned:
                if key(cfg) in done and not (cfg["method"] == "dense" and needs_dense):
                    continue
                method = cfg["method"]
                if method == "dense":
                    module, seconds = run_training(cfg, data, method_callbacks(cfg))
                    dense_net = module.net
                    if key(cfg) in done:
                        continue
                    results = dict(measure(module.net, data), train_seconds=seconds)
                elif method.startswith("dwf") or method == "model-pruning":
                    results = train_and_measure(cfg, data, method_callbacks(cfg))
                else:
                    no_ft, ft = oneshot(dense_net, cfg, data)
                    results = no_ft if method == "oneshot" else ft
                row = dict(config=cfg, results=results, versions=versions, finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key(cfg)] = row  # retire_stale rewrites the file from `done` for the next setting
                outcome = (
                    "diverged"
                    if results["acc"] is None
                    else f"acc {results['acc']:.4f}  CR {results['compression_ratio']:8.1f}"
                )
                print(
                    f"{dataset:13s} {model:8s} {method:13s} {cfg.get('lam', cfg.get('target', '')):>8} {outcome}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
