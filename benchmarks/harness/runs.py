"""Train and measure configs: one run, or a whole plan against the result store (skipping what is done)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, seed_everything
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from benchmarks.harness.fit import TrainCurve, fit, run_training
from benchmarks.harness.measure import measure, measure_layers
from benchmarks.harness.methods import cell_callbacks, make_module, pat_missing
from benchmarks.harness.store import append_rows, key, load_rows, make_row
from benchmarks.models import accuracy
from examples.data import ImageData, load_dataset
from lightning_dwf import DWFCallback, DWFDivergenceError


def train_and_measure(cfg: dict, data: ImageData, callbacks: list[Callback]) -> dict[str, Any]:
    """Train with :func:`~benchmarks.harness.fit.run_training`, then test the (collapsed) net.

    Args:
        cfg: The config.
        data: The dataset.
        callbacks: The method's callbacks.

    Returns:
        :func:`~benchmarks.harness.measure.measure`'s results, ``train_seconds`` and the ``control_threshold`` target
        mode used; a run DWFCallback stopped on NaN/Inf factors: ``acc=None`` and ``diverged``.
    """
    try:
        module, seconds = run_training(cfg, data, callbacks)
    except DWFDivergenceError as err:
        return dict(acc=None, compression_ratio=None, diverged=str(err).split(". ")[0])
    results = dict(measure(module.net, data), train_seconds=seconds)
    for cb in callbacks:  # record the control threshold target mode used (its default depends on the run)
        if isinstance(cb, DWFCallback) and cb.control_threshold:
            results["control_threshold"] = cb.control_threshold
    return results


def run_one(
    cfg: dict[str, Any], data: ImageData, dense_state: dict | None = None, save_to: Path | None = None
) -> dict[str, Any]:
    """Train and measure one matrix-cell config (:func:`~benchmarks.harness.methods.make_module`,
    :func:`~benchmarks.harness.methods.cell_callbacks`).

    Args:
        cfg: The config.
        data: The dataset.
        dense_state: A trained dense net's state to start from.
        save_to: Where to save the trained net's state.

    Returns:
        :func:`~benchmarks.harness.measure.measure_layers`' results, ``train_seconds``, the final net's training-set
        accuracy ``train_acc`` and the mean training loss of every epoch ``train_loss``; DWF's NaN/Inf stop:
        ``acc=None`` and ``diverged``; a configuration DWF refuses: ``acc=None`` and ``error``.
    """
    seed_everything(cfg["seed"], verbose=False)
    module = make_module(cfg, data.num_classes)
    if dense_state is not None:
        module.net.load_state_dict(dense_state)
    curve = TrainCurve()
    try:
        seconds = fit(cfg, module, data, [*cell_callbacks(cfg), curve])
    except MisconfigurationException as err:
        return dict(acc=None, error=str(err))
    except DWFDivergenceError as err:
        return dict(acc=None, diverged=str(err).split(". ")[0])
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        torch.save(module.net.state_dict(), save_to)
    train_acc = accuracy(module.net, data.train_x, data.train_y)
    return dict(measure_layers(module.net, data), train_seconds=seconds, train_acc=train_acc,
                train_loss=curve.epoch_losses)


def dense_path(cfg: dict[str, Any], results: Path) -> Path:
    """Where the trained dense net of ``cfg`` (a dense config) is kept for the from-pretrained runs.

    Args:
        cfg: The dense config.
        results: The results file.

    Returns:
        ``<results stem>_dense/<dataset>_<model>_<optimizer>_<hash of the config>.pt`` beside ``results``.
    """
    digest = hashlib.sha1(key(cfg).encode()).hexdigest()[:10]
    return results.parent / f"{results.stem}_dense" / f"{cfg['dataset']}_{cfg['model']}_{cfg['optimizer']}_{digest}.pt"


def outcome(res: dict[str, Any]) -> str:
    """One run's results in a few words, for the progress line.

    Args:
        res: The results.

    Returns:
        Accuracy, sparsity and emptied layers, or why there are none.
    """
    if res.get("acc") is None:
        return "diverged: " + res["diverged"] if "diverged" in res else "error: " + res.get("error", "?")[:100]
    return f"acc {res['acc']:.4f}  sparsity {res['sparsity']:.4f}" + (
        f"  emptied {res['emptied']}" if res["emptied"] else ""
    )


def record(cfg: dict[str, Any], res: dict[str, Any], results: Path, done: dict[str, dict]) -> None:
    """Append one run's row to ``results`` and ``done``, and print its progress line.

    Args:
        cfg: The config.
        res: Its results.
        results: The results file.
        done: The rows by key, updated.
    """
    row = make_row(cfg, res)
    append_rows(results, [row])
    done[key(cfg)] = row
    knob = f"{cfg['target']:<6}" if "target" in cfg else " " * 6
    print(
        f"{cfg['dataset']:13s} {cfg['model']:8s} {cfg['optimizer']:5s} b{cfg['batch_size']:<4d} {cfg['start']:10s} "
        f"{cfg['method']:13s} {knob} s{cfg['seed']} {outcome(res)}  ({res.get('train_seconds', 0):.0f} s)",
        flush=True,
    )


def dense_weights(src: dict[str, Any], data: ImageData, results: Path, done: dict[str, dict]) -> dict:
    """The trained dense net ``src`` names: from its file, else trained now (and its row recorded if missing).

    Args:
        src: The dense config.
        data: The dataset.
        results: The results file.
        done: The rows by key.

    Returns:
        The net's state dict.
    """
    path = dense_path(src, results)
    if not path.exists():
        res = run_one(src, data, save_to=path)
        if key(src) not in done:
            record(src, res, results, done)
    return torch.load(path, weights_only=True)


def run_plan(
    plan: list[dict[str, Any]],
    results: Path,
    data_dir: str | None = None,
    loader: Callable[..., ImageData] = load_dataset,
    dense_source: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    keep_dense: Callable[[dict[str, Any]], bool] | None = None,
) -> dict[str, dict]:
    """Run every matrix-cell config of ``plan`` not yet in ``results``, appending one row each.

    PAT runs are skipped with a logged reason when torchao cannot be imported.

    Args:
        plan: The configs, in order (a dense run before the runs that start from it).
        results: The results file.
        data_dir: Where the dataset files are.
        loader: ``loader(name, data_dir)`` loads a dataset.
        dense_source: The dense config a ``start="pretrained"`` config starts from (required if there are any).
        keep_dense: Whether a run's trained net is saved for later from-pretrained runs.

    Returns:
        Every row of ``results`` by key.
    """
    done = load_rows(results)
    results.parent.mkdir(parents=True, exist_ok=True)
    datasets: dict[str, ImageData] = {}
    skip_pat = pat_missing()
    for cfg in plan:
        if key(cfg) in done:
            continue
        if cfg["method"] == "pat" and skip_pat:
            print(
                f"skipped PAT ({skip_pat}): {cfg['dataset']} {cfg['model']} {cfg['optimizer']} b{cfg['batch_size']}",
                flush=True,
            )
            continue
        data = datasets.get(cfg["dataset"]) or datasets.setdefault(cfg["dataset"], loader(cfg["dataset"], data_dir))
        state = None
        if cfg["start"] == "pretrained":
            if dense_source is None:
                raise ValueError("run_plan: a from-pretrained config needs `dense_source`.")
            state = dense_weights(dense_source(cfg), data, results, done)
        source = keep_dense is not None and keep_dense(cfg)
        res = run_one(cfg, data, state, dense_path(cfg, results) if source else None)
        record(cfg, res, results, done)
    return done
