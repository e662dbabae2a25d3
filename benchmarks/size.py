"""Accuracy against file bytes: what each method's model costs on disk (Fashion-MNIST, LeNet-300-100 and the BN CNN).

For every model: dense float32; dense int8 (per-channel); ModelPruning (gradual global L1) with int8 / int4 export;
DWF with the defaults (``DWFCallback(depth=3, target_sparsity=T)``, nothing tuned) with int8 / int4 export, without
and with the quantization-aware finish (``quantize=QuantizeConfig(bits=...)``); quantized sparse decomposition of the
dense and of the DWF model. Every
file is written with :func:`lightning_dwf.save_compressed` (or the decomposition's own file) and its accuracy is
measured on the model *loaded back from that file*, so each row's bytes and accuracy belong to the same file.

    python -m benchmarks.size                 # runs what is missing (resumes), then writes the table and the plot
    python -m benchmarks.size --report        # table + plot only

Rows: ``benchmarks/results/size.jsonl``; table ``size_table.md``; plot ``size_<model>.png`` (accuracy vs bytes,
log scale). The DWF rows of the sweep's tuned recipe (factor LR ×10, its own recovery), measured before the defaults
led, and those of earlier SGD defaults (each row says which) are in ``size_superseded.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch
from torch import nn

from benchmarks import sweep
from benchmarks.harness import plots
from benchmarks.harness.fit import LR, MOMENTUM, SEED, run_training, train_loader
from benchmarks.harness.measure import measure
from benchmarks.harness.methods import method_callbacks
from benchmarks.harness.store import RESULTS, append_rows, key, make_row, read_rows
from benchmarks.models import Classifier
from examples.data import ImageData, load_dataset
from lightning_dwf import (
    DecomposeConfig,
    decompose_,
    finetune_,
    load_compressed,
    load_decomposed,
    save_compressed,
    save_decomposed,
)

PATH = RESULTS / "size.jsonl"
DATASET = "fashion-mnist"
MODELS = ("lenet300", "cnn-bn")
TARGETS = {"lenet300": (0.95, 0.98, 0.985, 0.99), "cnn-bn": (0.9, 0.95)}
#: Bit widths of the quantization-aware finish per model (the CNN, 2-3× slower per run, gets the 4-bit one only).
QAT_BITS = {"lenet300": (8, 4), "cnn-bn": (4,)}
#: DWF depth per model (the sweep's target-mode settings there).
DEPTH = {"lenet300": 3, "cnn-bn": 3}
#: Quantized sparse decomposition settings (one rank rule, one density per factor) and its short fine-tune.
QSD = {"lenet300": ({"rank_ratio": 0.25, "density": 0.1, "bits": 8}, {"rank_ratio": 0.25, "density": 0.1, "bits": 4}),
       "cnn-bn": ({"rank_ratio": 0.25, "density": 0.1, "bits": 8},)}
QSD_FINETUNE = dict(epochs=1, lr=1e-4)
#: Other lengths of the quantization-aware finish (fraction of the run; default 0.2): LeNet-300-100, 98 %, 4 bits.
QAT_FRACTIONS = (0.1, 0.3)
#: The DWF model QSD starts from (its target).
QSD_DWF_TARGET = {"lenet300": 0.95, "cnn-bn": 0.9}


def base_config(model: str) -> dict[str, Any]:
    epochs = sweep.MODES["full"]["epochs"][DATASET][model]
    return dict(
        dataset=DATASET,
        model=model,
        epochs=epochs,
        batch_size=sweep.BATCH_SIZE[DATASET],
        lr=LR,
        momentum=MOMENTUM,
        seed=SEED,
    )


def training_configs(model: str) -> list[dict[str, Any]]:
    """One trained model per config; each is exported at several bit widths."""
    base = base_config(model)
    out = [dict(base, method="dense")]
    for target in TARGETS[model]:
        out.append(dict(base, method="model-pruning", target=target))
        dwf = dict(base, method=f"dwf-target-d{DEPTH[model]}", recipe="defaults", depth=DEPTH[model], target=target)
        out.append(dwf)
        out += [dict(dwf, quantize_bits=bits) for bits in QAT_BITS[model]]
        if model == "lenet300" and target == 0.98:
            out += [dict(dwf, quantize_bits=4, quantize_fraction=f) for f in QAT_FRACTIONS]
        if target == QSD_DWF_TARGET[model]:
            out += [dict(dwf, qsd=qsd) for qsd in QSD[model]]
    out += [dict(base, method="dense", qsd=qsd) for qsd in QSD[model]]
    return out


def exports(cfg: dict[str, Any]) -> tuple[int | None, ...]:
    """The bit widths a trained model is written at: its own grid after the quantization-aware finish."""
    if cfg.get("quantize_bits") or cfg.get("qsd"):
        return (cfg.get("quantize_bits") or cfg["qsd"]["bits"],)
    return (None, 8) if cfg["method"] == "dense" else (None, 8, 4)


def file_row(cfg: dict[str, Any], net: nn.Module, data: ImageData, bits: int | None, seconds: float) -> dict:
    """Write ``net`` at ``bits``, load it into a fresh net, and measure that one."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        report = save_compressed(net, path, bits=bits)
        fresh = Classifier(cfg["model"], num_classes=data.num_classes).net
        load_compressed(fresh, path)
    results = dict(
        measure(fresh, data),
        file_bytes=report.file_bytes,
        dense_bytes=report.dense_bytes,
        csr_bytes=report.csr_bytes,
        size_ratio=report.ratio,
        train_seconds=seconds,
    )
    return make_row(dict(cfg, export_bits=bits), results, sweep.VERSIONED)


def qsd_row(cfg: dict[str, Any], net: nn.Module, data: ImageData, seconds: float) -> dict:
    """Decompose ``net`` (a trained plain net), fine-tune it briefly, write it, load it back collapsed, measure."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the small per-layer matrix work is far slower with threads fighting over 2 cores
    start = time.perf_counter()
    try:
        report = decompose_(net, DecomposeConfig(**cfg["qsd"]))
    finally:
        torch.set_num_threads(threads)
    loader = train_loader(data, cfg["batch_size"], cfg["seed"])
    finetune_(net, loader, nn.functional.cross_entropy, **QSD_FINETUNE)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.safetensors")
        saved = save_decomposed(net, path)
        fresh = Classifier(cfg["model"], num_classes=data.num_classes).net
        load_decomposed(fresh, path, collapse=True)
    results = dict(measure(fresh, data), file_bytes=saved.file_bytes, dense_bytes=saved.dense_bytes,
                   size_ratio=saved.ratio, train_seconds=seconds, qsd_seconds=time.perf_counter() - start,
                   reconstruction_error=[layer.error for layer in report.layers])
    return make_row(dict(cfg, export_bits=cfg["qsd"]["bits"]), results, sweep.VERSIONED)


def done() -> set[str]:
    """The keys of the trained configs already in :data:`PATH` (without the export's bit width)."""
    if not PATH.exists():
        return set()
    return {key({k: v for k, v in row["config"].items() if k != "export_bits"}) for row in read_rows(PATH)}


def run(models: tuple[str, ...], data_dir: str | None) -> None:
    data = load_dataset(DATASET, data_dir)
    finished = done()
    for model in models:
        for cfg in training_configs(model):
            if key(cfg) in finished:
                continue
            print(
                f"[size] {cfg['model']} {cfg['method']} {cfg.get('target', '')} bits={cfg.get('quantize_bits')}",
                flush=True,
            )
            train = {k: v for k, v in cfg.items() if k != "qsd"}
            module, seconds = run_training(train, data, method_callbacks(train))
            if cfg.get("qsd"):
                rows = [qsd_row(cfg, module.net, data, seconds)]
            else:
                rows = [file_row(cfg, module.net, data, bits, seconds) for bits in exports(cfg)]
            append_rows(PATH, rows)


def label(cfg: dict[str, Any]) -> str:
    bits = cfg.get("export_bits")
    width = "fp32" if bits is None else f"int{bits}"
    if cfg["method"] == "dense" and not cfg.get("qsd"):
        return f"dense {width}"
    name = "ModelPruning" if cfg["method"] == "model-pruning" else "DWF"
    if cfg.get("qsd"):
        return f"QSD of {'dense' if cfg['method'] == 'dense' else 'DWF'} int{cfg['qsd']['bits']}"
    fraction = cfg.get("quantize_fraction")
    finish = ""
    if cfg.get("quantize_bits"):
        finish = f" + QAT finish ({fraction:g} of the run)" if fraction else " + QAT finish"
    return f"{name} {width}{finish}"


def report() -> str:
    rows = read_rows(PATH)
    out = [
        "| model | method | target | accuracy % | file bytes | × smaller than dense fp32 | sparsity % |",
        "|---|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        mine = sorted((r for r in rows if r["config"]["model"] == model), key=lambda r: -r["results"]["file_bytes"])
        for r in mine:
            c, res = r["config"], r["results"]
            out.append(
                f"| {model} | {label(c)} | {c.get('target', '')} | {100 * res['acc']:.2f} | "
                f"{res['file_bytes']:,} | {res['size_ratio']:.1f} | {100 * res['sparsity']:.2f} |"
            )
    table = "\n".join(out)
    (RESULTS / "size_table.md").write_text(table + "\n")
    plot(rows)
    return table


def plot(rows: list[dict]) -> None:
    plt = plots.pyplot()
    for model in MODELS:
        mine = [r for r in rows if r["config"]["model"] == model]
        if not mine:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        groups: dict[str, list[tuple[float, float]]] = {}
        for r in mine:
            name = label({**r["config"], "export_bits": r["config"].get("export_bits")})
            groups.setdefault(name, []).append((r["results"]["file_bytes"], 100 * r["results"]["acc"]))
        for name, points in sorted(groups.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        dense = [r for r in mine if r["config"]["method"] == "dense" and r["config"].get("export_bits") is None]
        if dense:
            acc = 100 * dense[0]["results"]["acc"]
            ax.axhline(acc - 1, color="grey", linestyle=":", label="dense − 1 point")
        ax.set_xscale("log")
        ax.set_xlabel("file bytes (log scale)")
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"Fashion-MNIST {model}: accuracy against file size")
        ax.legend(fontsize=7)
        plots.save(fig, RESULTS / f"size_{model}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--report", action="store_true", help="only write the table and the plot")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.report:
        run(tuple(args.models), args.data_dir)
    print(report())


if __name__ == "__main__":
    main()
