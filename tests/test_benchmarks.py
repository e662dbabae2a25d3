"""The benchmark helpers: the gradual pruning schedule, the λ grid, and the report's table/plot."""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable

import pytest

from benchmarks import report, sweep
from benchmarks.harness import fit, measure, methods, runs, store
from examples.data import ImageData
from lightning_dwf import DWFDivergenceError, FixedLamConfig, ScheduleConfig


def _random_images(train: int, test: int) -> ImageData:
    """Fashion-MNIST-shaped noise with random labels (generator seed 0): ``train`` training and ``test`` test images."""
    import torch

    g = torch.Generator().manual_seed(0)
    return ImageData(
        "toy",
        torch.randn(train, 1, 28, 28, generator=g),
        torch.randint(0, 10, (train,), generator=g),
        torch.randn(test, 1, 28, 28, generator=g),
        torch.randint(0, 10, (test,), generator=g),
    )


@pytest.mark.parametrize("target", sweep.TARGETS)
@pytest.mark.parametrize("epochs", [1, 5, 20])
def test_gradual_schedule_reaches_target(target, epochs):
    amounts = methods.gradual_amounts(target, epochs)
    assert len(amounts) == epochs and all(0 <= a < 1 for a in amounts)
    remaining = math.prod(1 - a for a in amounts)
    assert 1 - remaining == pytest.approx(target)


def test_method_callbacks_passes_the_control_threshold():
    cfg = dict(method="dwf-target-d3", depth=3, target=0.98, recovery=0.5, factor_lr_multiplier=10.0)
    assert (
        methods.method_callbacks(dict(cfg, control_threshold="auto"))[0].schedule.control_threshold is None
    )  # the default
    assert methods.method_callbacks(dict(cfg, control_threshold=1e-3))[0].schedule.control_threshold == 1e-3
    assert methods.method_callbacks(cfg)[0].control_threshold is None


def test_retire_stale_moves_old_recipe_rows(tmp_path):
    path = tmp_path / "full.jsonl"
    rows = [
        dict(config=dict(dataset="d", model="m", method="dense")),
        dict(config=dict(dataset="d", model="m", method="old")),
        dict(config=dict(dataset="d", model="other", method="old")),
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    done = {store.key(r["config"]): r for r in rows}
    store.retire_stale(path, done, "d", "m", {store.key(rows[0]["config"])})
    kept = [json.loads(line)["config"] for line in path.read_text().splitlines()]
    assert kept == [rows[0]["config"], rows[2]["config"]] and len(done) == 2  # other settings are left alone
    assert [json.loads(line)["config"] for line in (tmp_path / "full_superseded.jsonl").read_text().splitlines()] == [
        rows[1]["config"]
    ]


def test_report_tables_and_plots(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    base = dict(dataset="toy", model="m", epochs=1, batch_size=8, lr=0.1, momentum=0.9)
    rows = [
        dict(config=dict(base, method="dense"), results=dict(acc=0.9, compression_ratio=1.0)),
        dict(config=dict(base, method="dwf-d3", lam=1e-3), results=dict(acc=0.85, compression_ratio=60.0)),
        dict(config=dict(base, method="dwf-d3", lam=1e-2), results=dict(acc=0.70, compression_ratio=math.inf)),
        dict(config=dict(base, method="model-pruning", target=0.99), results=dict(acc=0.8, compression_ratio=100.0)),
        dict(
            config=dict(base, method="dwf-d4", lam=1.0), results=dict(acc=None, compression_ratio=None, diverged="NaN")
        ),
        dict(
            config=dict(base, method="dwf-target-d2", depth=2, target=0.98, seed=0),
            results=dict(acc=0.82, compression_ratio=50.0, sparsity=0.98),
        ),
        dict(
            config=dict(base, method="dwf-target-d2", depth=2, target=0.98, seed=1),
            results=dict(acc=0.84, compression_ratio=50.0, sparsity=0.98),
        ),
    ]
    (tmp_path / "full.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    text = report.tables(report.load("full"))
    assert "| DWF D=3 | 85.00 | 85.00 | 85.00 | 70.00 | 70.00 | 70.00 |" in text
    assert "| ModelPruning (gradual L1) | 80.00 | 80.00 | 80.00 | 80.00 | — | — |" in text
    assert "| DWF D=4 | — | — | — | — | — | — |" in text and "diverged" in text
    assert (
        "| DWF D=2, target_sparsity | 83.00 | 83.00 | 83.00 | — | — | — |" in text
        and "0.98 (reached 98.00 %) | 83.00 ± 1.41 (mean ± sd of 2 seeds)" in text
    )
    paths = report.plots(report.load("full"), "full")
    assert [p.name for p in paths] == ["full_toy_m.png"] and paths[0].stat().st_size > 0


def test_oneshot_and_model_pruning_hit_their_sparsity(tmp_path):
    """One-shot pruning (with masks kept through fine-tuning) and the gradual ModelPruning schedule reach the
    target on real layers."""

    from benchmarks.models import lenet_300_100

    data = _random_images(128, 64)
    cfg = dict(model="lenet300", target=0.9, finetune_epochs=1, batch_size=32, epochs=3)
    no_ft, ft = methods.oneshot(lenet_300_100(), cfg, data)
    assert no_ft["sparsity"] == pytest.approx(0.9, abs=1e-3) and ft["sparsity"] == pytest.approx(0.9, abs=1e-3)
    mp = methods.LayerPruning(
        "l1_unstructured",
        parameter_names=["weight"],
        amount=methods.GradualAmount(methods.gradual_amounts(0.9, 3)),
        use_global_unstructured=True,
        use_lottery_ticket_hypothesis=False,
        verbose=0,
    )
    module, _ = fit.run_training(cfg, data, [mp])
    assert measure.measure(module.net, data)["sparsity"] == pytest.approx(0.9, abs=1e-3)


def test_probe_config_and_table(tmp_path, monkeypatch):
    """The probe builds the sweep's config schema and its table groups seeds, marking divergences."""
    from benchmarks import probe

    args = argparse.Namespace(
        dataset="fashion-mnist",
        model="lenet300",
        epochs=None,
        seed=1,
        depth=3,
        target=0.98,
        lam=None,
        factor_lr_multiplier=10.0,
        factor_lr_warmup=0.1,
        recovery=0.5,
        controller_gain=0.0,
        init="dwf",
        controller_max_step=None,
        control_threshold=None,
        model_pruning=False,
        dense=False,
        defaults=False,
        accelerator="cpu",
        precision="32-true",
    )
    cfg = probe.config(args)
    assert (
        cfg["method"] == "dwf-target-d3"
        and cfg["epochs"] == 20
        and cfg["controller_gain"] == 0.0
        and "controller_max_step" not in cfg
    )
    assert cfg["control_threshold"] == "auto"  # the callback's default, recorded as such
    assert probe.config(argparse.Namespace(**{**vars(args), "control_threshold": 1e-2}))["control_threshold"] == 1e-2
    assert probe.config(argparse.Namespace(**{**vars(args), "model_pruning": True}))["method"] == "model-pruning"
    dense = probe.config(argparse.Namespace(**{**vars(args), "dense": True}))
    assert dense["method"] == "dense" and "target" not in dense and "depth" not in dense
    assert methods.method_callbacks(dense) == []  # a plain run
    plain = probe.config(argparse.Namespace(**{**vars(args), "defaults": True}))  # the callback's defaults, no recipe
    assert plain["recipe"] == "defaults" and "factor_lr_multiplier" not in plain and "recovery" not in plain
    (callback,) = methods.method_callbacks(plain)
    assert (callback.target_sparsity, callback.factor_lr.multiplier) == (0.98, "auto")
    assert callback.schedule == ScheduleConfig()
    assert "accelerator" not in cfg and "precision" not in cfg  # CPU float32 rows keep the sweep's keys
    gpu = probe.config(argparse.Namespace(**{**vars(args), "accelerator": "gpu", "precision": "16-mixed"}))
    assert (gpu["accelerator"], gpu["precision"]) == ("gpu", "16-mixed")
    rows = [
        dict(config=dict(cfg, seed=s), results=dict(acc=a, compression_ratio=50.0)) for s, a in ((0, 0.88), (1, 0.89))
    ]
    rows.append(dict(config=dict(cfg, factor_lr_multiplier=20.0), results=dict(acc=None, compression_ratio=None)))
    monkeypatch.setattr(probe, "PATH", tmp_path / "probes.jsonl")
    probe.PATH.write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = probe.table()
    assert (
        "| 88.00 / 89.00 | 88.50 | 50.0 |" in text
        and "| NaN | diverged | — |" in text
        and "controller_gain=0.0" in text
    )


def test_overhead_measures_every_depth():
    """The overhead benchmark's row: counted memory grows with D, times are positive."""
    from benchmarks import overhead

    row = overhead.measure_model(
        "lenet300", argparse.Namespace(device="cpu", batch_size=2, rounds=1, steps=1), amp=False
    )
    ratios = [row["memory_ratio"][c] for c in overhead.CONFIGS]
    assert ratios[0] == 1.0 and ratios == sorted(ratios) and ratios[-1] > 1.1
    assert all(t > 0 for t in row["step_seconds"].values()) and row["inference_ratio"] > 0


@pytest.mark.parametrize("name", ["vgg11-bn", "resnet18"])
def test_cifar_shaped_nets_factorize_and_collapse_exactly(name):
    """The GPU overhead nets (nested blocks, shortcuts) factorize everywhere and collapse back to the same function."""
    import torch

    from benchmarks.models import CIFAR_MODELS, INPUT_SHAPES
    from lightning_dwf import FactorizeConfig, collapse_, factorize_

    torch.manual_seed(0)
    net = CIFAR_MODELS[name]().eval()
    x = torch.randn(2, *INPUT_SHAPES[name])
    with torch.no_grad():
        before = net(x)
        layers = measure.prunable(net)
        assert len(factorize_(net, 3, config=FactorizeConfig(init="balanced"))) == len(layers)
        collapse_(net)
        torch.testing.assert_close(net(x), before, rtol=1e-4, atol=1e-5)


def test_vit_forward_and_factorization():
    """The tiny ViT maps 1×28×28 images to logits, and DWF's default selection factorizes its attention and MLP
    Linears."""
    import torch

    from benchmarks.models import INPUT_SHAPES, MODELS
    from lightning_dwf import factorize_

    net = MODELS["vit"]()
    assert net(torch.randn(3, *INPUT_SHAPES["vit"])).shape == (3, 10) and INPUT_SHAPES["vit"] == (1, 28, 28)
    names = factorize_(net, 3)
    for block in (0, 1):
        for layer in ("attn.q", "attn.k", "attn.v", "attn.out", "mlp.0", "mlp.2"):
            assert f"blocks.{block}.{layer}.weight" in names
    assert {"embed.weight", "head.weight"} <= set(names) and len(names) == len(measure.prunable(MODELS["vit"]()))


def test_classifier_default_is_the_sweep_recipe():
    """Without options the Classifier is SGD + CosineAnnealingLR (the sweep's); warm-up ramps linearly, then cosine
    to 0."""
    import torch

    from benchmarks.models import Classifier, WarmupCosine

    module = Classifier("lenet300")
    module.trainer = argparse.Namespace(estimated_stepping_batches=100)  # what configure_optimizers reads
    conf = module.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.SGD and conf["optimizer"].defaults["momentum"] == 0.9
    assert (
        conf["optimizer"].defaults["weight_decay"] == 0
        and type(conf["lr_scheduler"]["scheduler"]).__name__ == "CosineAnnealingLR"
    )
    schedule = WarmupCosine(100, 5)
    assert [schedule(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert schedule(5) == 1.0 and schedule(100) == pytest.approx(0.0) and 0 < schedule(50) < 1


def test_matrix_plan_sizes():
    """5 settings × 2 optimizers × (2 batch sizes × (dense + 3 targets × 3 methods) + 3 targets × 2 from-pretrained
    runs), then the axis: 3 short-run settings × 2 optimizers × 2 batch sizes and 3 small-data settings × 2 optimizers
    × batch 64, each dense + 3 targets × 3 methods, from scratch."""
    from benchmarks import matrix

    main = matrix.plan_first_pass(axis=False)
    assert len(main) == 5 * 2 * (2 * (1 + 3 * 3) + 3 * 2) == 260
    plan = matrix.plan_first_pass()
    axis = plan[len(main):]
    assert plan[:len(main)] == main and len(axis) == (3 * 2 * 2 + 3 * 2) * (1 + 3 * 3) == 180
    assert len({store.key(c) for c in plan}) == 440 and all(c["start"] == "scratch" for c in axis)
    assert {(c["dataset"], c["epochs"], c["batch_size"]) for c in axis} == {
        ("fashion-mnist", 3, 64), ("fashion-mnist", 3, 256), ("fashion-mnist-2k", 40, 64)
    }
    pretrained = [c for c in plan if c["start"] == "pretrained"]
    assert all(
        c["batch_size"] == 256 and c["epochs"] == matrix.pretrained_epochs(c["dense_epochs"]) for c in pretrained
    )
    keys = {store.key(c) for c in plan}
    assert all(store.key(matrix.dense_source(c)) in keys for c in pretrained)  # each starts from a planned dense run
    only = matrix.parse_only("model=vit,opt=adamw,bs=64,target=0.98")
    assert len([c for c in plan if matrix.selected(c, only)]) == 1 + 3  # dense (every target) and the cell's 3 methods


def _row(cfg, acc):
    return dict(config=cfg, results=dict(acc=acc, sparsity=cfg.get("target", 0.0), emptied=[]))


def test_matrix_second_pass_seeds_close_and_behind_cells():
    from benchmarks import matrix

    base = matrix.base_config("fashion-mnist", "lenet5", "sgd", 64)
    rows = [_row(dict(base, method="dense"), 0.90)]
    cells = {0.9: (0.880, 0.870, 0.884), 0.98: (0.85, 0.86, 0.80), 0.995: (0.70, 0.60, 0.75)}  # close, behind, ahead
    for target, (mp, pat, dwf) in cells.items():
        rows += [_row(dict(base, method=m, target=target), a) for m, a in zip(matrix.METHODS[1:], (mp, pat, dwf))]
    short = dict(base, start="pretrained", epochs=2, dense_epochs=base["epochs"])  # from pretrained: behind, ahead
    rows += [_row(dict(short, method="dwf-balanced", target=0.9), 0.85), _row(dict(short, method="model-pruning",
                                                                               target=0.9), 0.86)]
    rows += [_row(dict(short, method="dwf-balanced", target=0.98), 0.80), _row(dict(short, method="model-pruning",
                                                                                target=0.98), 0.60)]
    second = matrix.plan_second_pass(rows)
    scratch = [c for c in second if c["start"] == "scratch"]
    assert {(c["method"], c.get("target"), c["seed"]) for c in scratch} == {
        (m, t, s)
        for s in (1, 2)
        for m, t in [("dense", None)] + [(m, t) for m in matrix.METHODS[1:] for t in (0.9, 0.98)]
    }
    # a cell seeded before (its ModelPruning has seed 1) is seeded again, although DWF is now ahead there
    seeded_before = rows + [_row(dict(base, method="model-pruning", target=0.995, seed=1), 0.70)]
    again = {(c["method"], c["seed"]) for c in matrix.plan_second_pass(seeded_before) if c.get("target") == 0.995}
    assert again == {(m, s) for s in (1, 2) for m in matrix.METHODS[1:]}
    pretrained = [c for c in second if c["start"] == "pretrained"]  # no dense run: they start from the seed-0 net
    assert {(c["method"], c["target"], c["seed"]) for c in pretrained} == {
        (m, 0.9, s) for s in (1, 2) for m in matrix.PRETRAINED_METHODS
    }
    assert all(matrix.dense_source(c)["seed"] == 0 for c in pretrained)


def test_matrix_short_run_is_its_own_cell_and_subset_is_stratified():
    """A 3-epoch cell of a model is not merged with the model's main cell (nor their dense rows); the small-data
    subset keeps the same number of images per class and the whole test set."""
    import torch

    from benchmarks import matrix

    main, short = (matrix.base_config("fashion-mnist", "lenet300", "sgd", 64, e) for e in (None, 3))
    rows = [_row(dict(b, method="dense"), acc) for b, acc in ((main, 0.89), (short, 0.87))]
    rows += [_row(dict(b, method="dwf", target=0.9), acc) for b, acc in ((main, 0.88), (short, 0.85))]
    cells = matrix.table_cells(rows)
    assert len(cells) == 2
    for (*_, epochs, _target), by_method in cells.items():
        assert {r["config"]["epochs"] for runs in by_method.values() for r in runs} == {epochs}
    labels = torch.arange(100) % 4
    data = ImageData("toy", torch.arange(100.0).reshape(100, 1, 1, 1), labels, torch.zeros(7, 1, 1, 1),
                     torch.zeros(7, dtype=torch.long))
    subset = matrix.training_subset(data, 20, "toy-20")
    assert subset.name == "toy-20" and subset.train_y.bincount().tolist() == [5, 5, 5, 5]
    assert torch.equal(data.train_y[subset.train_x.flatten().long()], subset.train_y)  # images keep their labels
    kept = subset.train_x.flatten().tolist()
    assert kept == sorted(kept) and subset.test_x.shape[0] == 7


def test_matrix_summary_one_line_per_setting():
    """The README's table: per target DWF (its gap to the better peer) / ModelPruning / PAT, seed means marked ³;
    from-pretrained cells are left out."""
    from benchmarks import matrix

    base = matrix.base_config("fashion-mnist", "lenet5", "sgd", 64)
    rows = [_row(dict(base, method="dense"), 0.90)]
    for seed, (mp, pat, dwf) in enumerate([(0.881, 0.870, 0.884), (0.883, 0.871, 0.885), (0.882, 0.869, 0.883)]):
        accs = zip(matrix.METHODS[1:], (mp, pat, dwf))
        rows += [_row(dict(base, method=m, target=0.9, seed=seed), a) for m, a in accs]
    rows += [_row(dict(base, method=m, target=0.98), a) for m, a in zip(matrix.METHODS[1:], (0.86, 0.80, 0.85))]
    short = dict(base, start="pretrained", epochs=2, dense_epochs=base["epochs"])
    rows += [_row(dict(short, method="dwf-balanced", target=0.9), 0.5)]
    header, rule, line = matrix.summary(rows).splitlines()
    assert header.startswith(
        "| data | model | optimizer | batch | epochs | 90 %: DWF / MP / PAT | 98 %: DWF / MP / PAT |"
    )
    assert line == (
        "| fashion-mnist | lenet5 | sgd | 64 | 6 | **88.40³** (+0.20) / 88.20³ / 87.00³ "
        "| **85.00** (-1.00) / 86.00 / 80.00 |"
    )


def test_matrix_end_to_end(tmp_path, monkeypatch):
    """One cell per method (and both from-pretrained runs) on synthetic images, a diverged DWF run, and the report."""

    from benchmarks import matrix

    data = _random_images(480, 64)
    plan = [
        dict(c, batch_size=4)
        for c in matrix.plan_first_pass(epochs=3, axis=False)
        if c["model"] == "lenet300"
        and c["dataset"] == "fashion-mnist"
        and c["optimizer"] == "sgd"
        and c["batch_size"] == 256
        and c.get("target", 0.9) == 0.9
    ]
    plan = [dict(c, epochs=1, **({"dense_epochs": 1} if "dense_epochs" in c else {})) for c in plan]  # 120 steps
    assert [c["method"] for c in plan] == ["dense", "model-pruning", "pat", "dwf", "dwf-balanced", "model-pruning"]
    monkeypatch.setattr(matrix, "PRETRAINED_BATCH", 4)
    path = tmp_path / "matrix.jsonl"
    rows = matrix.run_all(plan, path, loader=lambda name, root: data)
    expected = 5 if methods.pat_missing() else 6  # without torchao (CI) PAT is skipped with a reason and no row
    assert len(rows) == expected and len(path.read_text().splitlines()) == expected
    for row in rows.values():
        res = row["results"]
        if row["config"]["method"] != "pat" or not methods.pat_missing():
            assert res["acc"] is not None and res["train_seconds"] > 0 and row["versions"]["torch"]
        assert row["machine"]["isa"] and row["machine"]["threads"] >= 1 and row["machine"]["cores"] >= 1
        if row["config"]["method"] != "dense":
            assert res["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert len(list((tmp_path / "matrix_dense").glob("*.pt"))) == 1
    assert matrix.run_all(plan, path, loader=lambda name, root: data) == rows  # resumes: nothing left to run

    def nan_fit(*args):
        raise DWFDivergenceError(
            "DWFCallback: the factors of ['net.1'] became NaN/Inf at step 3 (learning rates [0.1]). More text"
        )

    monkeypatch.setattr(runs, "fit", nan_fit)
    diverged = dict(plan[3], target=0.98)
    res = matrix.run_all([diverged], path, loader=lambda name, root: data)[store.key(diverged)]["results"]
    assert res["acc"] is None and res["diverged"].endswith("at step 3 (learning rates [0.1])")
    md, png = matrix.report(path)
    text = md.read_text()
    assert "| fashion-mnist | lenet300 | sgd | 4 | scratch | 1 | 90 % |" in text and "| pretrained |" in text
    assert "diverged: DWF s0" in text and png.stat().st_size > 0


def test_size_benchmark_plans_and_measures_the_loaded_file(tmp_path, monkeypatch):
    """Every method of the size benchmark is planned; a row's bytes are the file's and its accuracy is that of the
    net loaded back from it (int8 of a sparse net: zeros stay, the file is smaller than the lossless one)."""
    import torch

    from benchmarks import size
    from benchmarks.harness import methods as methods_of
    from benchmarks.models import lenet_300_100

    plan = size.training_configs("lenet300")
    methods = {(c["method"], c.get("quantize_bits"), bool(c.get("qsd"))) for c in plan}
    assert ("dense", None, False) in methods and ("model-pruning", None, False) in methods
    assert ("dwf-target-d3", 4, False) in methods and ("dwf-target-d3", None, True) in methods
    assert ("dense", None, True) in methods
    for cfg in (c for c in plan if c["method"].startswith("dwf") and not c.get("qsd")):  # the defaults, nothing tuned
        assert cfg["recipe"] == "defaults" and "factor_lr_multiplier" not in cfg and "recovery" not in cfg
        (callback,) = methods_of.method_callbacks(cfg)
        assert (callback.target_sparsity, callback.factor_lr.multiplier) == (cfg["target"], "auto")
        assert callback.schedule == ScheduleConfig()
        bits, fraction = cfg.get("quantize_bits"), cfg.get("quantize_fraction", 0.2)
        assert (callback.quantize.bits, callback.quantize.fraction) == (bits, fraction) if bits else (
            callback.quantize is None)
    assert size.exports(dict(method="dense")) == (None, 8) and size.exports(dict(method="x", quantize_bits=4)) == (4,)
    g = torch.Generator().manual_seed(0)
    data = ImageData("toy", torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g),
                     torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g))
    net = lenet_300_100()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(torch.rand_like(p) > 0.9)
    cfg = dict(model="lenet300", method="model-pruning", target=0.9)
    lossless, int8 = (size.file_row(cfg, net, data, bits, 1.0) for bits in (None, 8))
    assert lossless["results"]["acc"] == pytest.approx(measure.measure(net, data)["acc"])
    assert int8["results"]["file_bytes"] < lossless["results"]["file_bytes"] < lossless["results"]["dense_bytes"]
    assert int8["results"]["sparsity"] == pytest.approx(lossless["results"]["sparsity"], abs=1e-3)
    assert int8["config"]["export_bits"] == 8 and size.label(int8["config"]) == "ModelPruning int8"


def test_fixed_lam_plan_callback_and_table():
    """Fixed λ on a matrix cell: the cell's training setting, DWFCallback(depth=3, lam=λ) and nothing else, a table."""
    from benchmarks import fixed_lam, matrix

    configs = fixed_lam.plan("fashion-mnist", "lenet300", "adamw", 64, [0.3, 1.0])
    assert [c["lam"] for c in configs] == [0.3, 1.0] and all(c["method"] == "dwf-lam" for c in configs)
    assert {k: v for k, v in configs[0].items() if k not in ("method", "lam")} == matrix.base_config(
        "fashion-mnist", "lenet300", "adamw", 64
    )
    (callback,) = methods.cell_callbacks(configs[1])
    assert (callback.regime_config, callback.target_sparsity, callback.depth) == (FixedLamConfig(1.0, recovery=0.0),
                                                                                   None, 3)
    from benchmarks.harness.tables import parse_recovery

    default = fixed_lam.plan("fashion-mnist", "lenet300", "sgd", 256, [1e-3], recovery=parse_recovery("default"))
    assert default[0]["recovery"] == 0.5  # stored as the value it stood for when the row was made
    assert methods.cell_callbacks(default[0])[0].regime_config == FixedLamConfig(1e-3, recovery=0.5)
    assert callback.factor_lr.multiplier == "auto"
    rows = [
        dict(config=configs[1], results=dict(acc=0.8, sparsity=0.99, compression_ratio=100.0, emptied=[])),
        dict(config=configs[0], results=dict(acc=None, diverged="NaN/Inf")),
    ]
    lines = fixed_lam.table(rows).splitlines()
    assert lines[2].endswith("| 0.3 | diverged | | | |") and lines[3].endswith("| 1 | 99.00 | 100.0 | 80.00 | — |")

    other_lr = fixed_lam.plan("fashion-mnist", "lenet300", "sgd", 256, [1e-3], lr=0.2)
    peers = fixed_lam.plan_peers("fashion-mnist", "lenet300", "sgd", 256, lr=0.2)
    assert other_lr[0]["lr"] == 0.2 and all(c["lr"] == 0.2 and "lam" not in c for c in peers)
    assert [(c["method"], c.get("target")) for c in peers] == [("dense", None)] + [
        ("model-pruning", t) for t in fixed_lam.PEER_TARGETS
    ]
    peer_rows = [dict(config=peers[1], results=dict(acc=0.85, sparsity=0.9, compression_ratio=10.0)),
                 dict(config=peers[0], results=dict(acc=None, diverged="NaN/Inf"))]
    lines = fixed_lam.peer_table(peer_rows).splitlines()
    assert lines[2].endswith("| 0.2 | dense | 0.00 | 0.0 | diverged |")
    assert lines[3].endswith("| 0.2 | model-pruning | 90.00 | 10.0 | 85.00 |")


def test_factor_lr_plan_callback_and_table():
    """A factor-LR variant of a matrix cell: the cell's setting, one multiplier for every tensor, a table beside the
    matrix's own DWF ("auto") and peer rows of the same seeds."""
    from benchmarks import factor_lr, matrix

    configs = factor_lr.plan("fashion-mnist", "lenet5", "sgd", 64, [0.995], [1.0], [0, 1])
    assert [(c["seed"], c["factor_lr_multiplier"]) for c in configs] == [(0, 1.0), (1, 1.0)]
    assert {k: v for k, v in configs[0].items() if k not in ("method", "target", "factor_lr_multiplier")} == (
        matrix.base_config("fashion-mnist", "lenet5", "sgd", 64)
    )
    (callback,) = methods.cell_callbacks(configs[0])
    assert (callback.target_sparsity, callback.depth, callback.factor_lr.multiplier) == (0.995, 3, 1.0)
    (auto,) = methods.cell_callbacks({k: v for k, v in configs[0].items() if k != "factor_lr_multiplier"})
    assert (auto.factor_lr.multiplier, auto.factor_lr.pattern_step_cap) == ("auto", 1.0)  # the library's two phases
    (named,) = factor_lr.plan("fashion-mnist", "lenet5", "sgd", 64, [0.995], ["auto"], [0], step_cap=1.0)
    (capped,) = methods.cell_callbacks(named)  # the library's rule under another step cap
    assert (capped.factor_lr.multiplier, capped.factor_lr.step_cap, named["step_cap"]) == ("auto", 1.0, 1.0)
    assert capped.factor_lr.pattern_step_cap is None  # a probe row's step_cap held throughout, as it ran
    assert factor_lr._multiplier_argument("auto") == "auto"

    def row(cfg, acc, **extra):
        return dict(config=cfg, results=dict(acc=acc, sparsity=0.995, emptied=[], **extra))

    base = {k: v for k, v in configs[0].items() if k != "factor_lr_multiplier"}
    reference = [row(dict(base, method=m, seed=s), acc) for m, acc in (("dwf", 0.4), ("model-pruning", 0.7))
                 for s in (0, 1, 2)]
    rows = [row(configs[0], 0.80, layer_nonzeros={"a": 3, "b": 4}), row(configs[1], 0.82)]
    (line,) = factor_lr.table(rows, reference).splitlines()[2:]
    assert "| 99.5 % | 3 | ×1 | 81.00 (80.00 / 82.00) | 3/4 | 40.00 (40.00 / 40.00) | 70.00 (70.00 / 70.00) | — |" in (
        line
    )
    (deep,) = factor_lr.plan("fashion-mnist", "lenet5", "sgd", 64, [0.995], [2.5], [0], depth=4)
    assert deep["depth"] == 4 and methods.cell_callbacks(deep)[0].depth == 4  # D = 3 configs carry no depth key
    (line,) = factor_lr.table([row(deep, 0.5)], reference).splitlines()[2:]
    assert "| 99.5 % | 4 | ×2.5 | 50.00 | — | 40.00 | 70.00 | — |" in line  # seed 0's matrix rows beside it


def test_factor_lr_peers_are_the_matrix_configs_of_a_cell_outside_it_and_fill_its_reference_columns():
    """``--peers``: a crossing cell's dense, default-DWF and ModelPruning configs carry the matrix's own keys, and the
    table takes its reference columns from them when the matrix has no such cell."""
    from benchmarks import factor_lr, matrix

    peers = factor_lr.plan_peers("mnist-subset-2k", "lenet300", "sgd", 64, [0.98], [0, 1], epochs=40)
    base = matrix.base_config("mnist-subset-2k", "lenet300", "sgd", 64, 40)
    assert peers == [dict(base, method="dense", seed=0), dict(base, method="dense", seed=1)] + [
        dict(base, method=m, target=0.98, seed=s) for m in ("dwf", "model-pruning") for s in (0, 1)
    ]
    (probe,) = factor_lr.plan("mnist-subset-2k", "lenet300", "sgd", 64, [0.98], ["min"], [0], epochs=40)

    def row(cfg, acc):
        return dict(config=cfg, results=dict(acc=acc, sparsity=0.98, emptied=[]))

    rows = [row(probe, 0.9), *(row(c, acc) for c, acc in zip(peers, (0.95, 0.96, 0.8, 0.82, 0.85, 0.87)))]
    (line,) = factor_lr.table(rows, []).splitlines()[2:]
    assert "| mnist-subset-2k | lenet300 | sgd | 64 | 40 | 98 % | 3 | min | 90.00 | — | 80.00 | 85.00 | — |" in line


def test_factor_lr_table_reads_a_probe_against_the_reference_rows_of_its_own_host():
    """Where a reference method has rows of the probe's host (``machine.isa``) beside rows of another, the table shows
    only the same host's; where it has none, the other host's."""
    from benchmarks import factor_lr

    (probe,) = factor_lr.plan("fashion-mnist", "cnn-bn", "sgd", 64, [0.9], ["no-penalty"], [0])
    base = {k: v for k, v in probe.items() if k != "factor_lr_multiplier"}

    def row(cfg, acc, isa):
        return dict(config=cfg, results=dict(acc=acc, sparsity=0.9, emptied=[]), machine=dict(isa=isa))

    matrix_rows = [row(dict(base, method=m), acc, "AVX512") for m, acc in (("dwf", 0.91), ("model-pruning", 0.92),
                                                                         ("pat", 0.93))]
    here = [row(dict(base, method=m), acc, "AVX2") for m, acc in (("dwf", 0.90), ("model-pruning", 0.94))]
    (line,) = factor_lr.table([row(probe, 0.95, "AVX2"), *here], matrix_rows).splitlines()[2:]
    assert line.endswith("| 95.00 | — | 90.00 | 94.00 | 93.00 |"), line  # PAT: no AVX2 row, the AVX512 one


@pytest.mark.parametrize(("name", "full", "size"), [("fashion-mnist-4k", "fashion-mnist", 4_000),
                                                    ("mnist-subset-2k", "mnist-subset", 2_000)])
def test_crossing_subsets_keep_a_stratified_share_of_their_full_dataset(name, full, size, monkeypatch):
    """The crossing datasets of the factor-LR probe: ``size // classes`` images of every class, the full test set."""
    from benchmarks import matrix

    data = _random_images(6_000, 32)
    monkeypatch.setattr(matrix, "load_dataset", lambda n, root=None: data if n == full else None)
    sub = matrix.load_matrix_dataset(name)
    import torch

    assert sub.name == name and matrix.TRAIN_SIZE[name] == size
    assert sub.train_y.bincount(minlength=data.num_classes).tolist() == [size // data.num_classes] * data.num_classes
    assert torch.equal(sub.test_x, data.test_x)


def test_run_one_records_the_training_curve_and_training_accuracy(tmp_path):
    """Every matrix-cell row carries the mean training loss of each epoch (falling as a dense net memorizes a small
    set) and the final net's training accuracy (that of the saved net)."""
    import torch

    from benchmarks import matrix
    from benchmarks.models import accuracy

    data = _random_images(64, 16)
    cfg = dict(matrix.base_config("fashion-mnist", "lenet300", "sgd", 16, epochs=6), method="dense")
    res = runs.run_one(cfg, data, save_to=tmp_path / "net.pt")
    assert len(res["train_loss"]) == 6 and all(math.isfinite(v) and v > 0 for v in res["train_loss"])
    assert res["train_loss"][-1] < res["train_loss"][0]
    net = methods.make_module(cfg, data.num_classes).net
    net.load_state_dict(torch.load(tmp_path / "net.pt"))
    assert res["train_acc"] == accuracy(net, data.train_x, data.train_y) > 0.5


@pytest.mark.parametrize("model", ["lenet300", "vit"])
def test_structured_speed_cells_run_on_a_small_subset(tmp_path, monkeypatch, model):
    """Every method of the structured speed benchmark trains, hits the MACs budget (the peers by their own search) and
    is timed against dense; the report renders a table row. A few hundred images, one epoch, tiny timing runs. In the
    ViT, structured DWF and Torch-Pruning remove whole heads; row pruning cannot reach the budget there and says so."""
    import torch

    from benchmarks import structured_speed as ss

    torch.manual_seed(0)
    data = ImageData("tiny", torch.rand(512, 1, 28, 28), torch.arange(512) % 10, torch.rand(64, 1, 28, 28),
                     torch.randint(0, 10, (64,)))
    monkeypatch.setattr(ss, "BATCH_SIZE", 16)  # 64 optimizer steps: enough for target mode's schedule
    monkeypatch.setattr(ss, "KERNEL_RUN_TIME", 0.01)
    monkeypatch.setattr(ss, "BISECTION_STEPS", 5)
    dense: dict = {}
    rows, nets = [], []
    for method in ("dense", "dwf-structured", "torch-pruning", "ln-structured", "dwf"):
        cfg = dict(model=model, opt="adamw", method=method, budget=1.0 if method == "dense" else 0.25,
                   epochs=2, seed=0)
        if model == "vit" and method == "ln-structured":
            with pytest.raises(ValueError, match="cannot reach"):
                ss.train_cell(cfg, data, dense)
            continue
        row, made = ss.train_cell(cfg, data, dense)
        rows.append(row)
        nets.append(made)
        if method in ("dwf-structured", "torch-pruning", "ln-structured"):
            assert row["macs"] <= 0.25 * row["dense_macs"]
        if model == "vit" and method in ("dwf-structured", "torch-pruning"):
            attn = made["main"].blocks[0].attn
            assert 1 <= attn.heads < 4 and attn.q.out_features == 16 * attn.heads  # whole heads went
    ss.time_group(rows, nets, dense["adamw"], data, min_run_time=0.01, rounds=1)
    assert all(r["speedup_b64"] > 0 for r in rows) and "csr_speedup_b1" in rows[-1]
    out = tmp_path / "speed.jsonl"
    store.append_rows(out, [r | dict(threads=1, machine="x", dataset="tiny", versions={"torch": "x"}) for r in rows])
    monkeypatch.setattr(ss, "plot", lambda rows, path: None)
    ss.write_report(out)
    assert f"| {model} | adamw | 25% |" in out.with_suffix(".md").read_text()


def test_peer_ratio_search_survives_a_cost_that_rises_near_one():
    """The peers' uniform ratio: the smallest that fits, found from a grid first, so a cost that is not monotone near 1
    (Torch-Pruning skipping a layer it would empty) neither refuses a reachable budget nor lands on the wrong side."""
    from benchmarks.structured_speed import smallest_fitting_ratio

    ratio = smallest_fitting_ratio(lambda r: 0.42 <= r <= 0.9, "unreachable")
    assert 0.42 <= ratio < 0.42 + 0.05 / 2 ** 11
    assert smallest_fitting_ratio(lambda r: r >= 0.99, "unreachable") == 0.99
    with pytest.raises(ValueError, match="unreachable"):
        smallest_fitting_ratio(lambda r: False, "unreachable")


@pytest.mark.parametrize("method", ["torch-pruning", "ln-structured"])
def test_peers_start_from_the_cells_seeded_init(monkeypatch, method):
    """A peer's network is initialized from the cell's seed (as dense and DWF are), not from whatever state the random
    generator was left in by the cells before it."""
    import torch

    from benchmarks import structured_speed as ss

    data = ImageData("tiny", torch.rand(64, 1, 28, 28), torch.arange(64) % 10, torch.rand(8, 1, 28, 28),
                     torch.randint(0, 10, (8,)))
    seen = []

    def first_fit(cfg, data, callbacks, module=None, epochs=None, **trainer):
        seen.append({k: v.clone() for k, v in module.state_dict().items()})
        raise StopIteration

    monkeypatch.setattr(ss, "fit", first_fit)
    cfg = dict(model="lenet300", opt="sgd", method=method, budget=0.5, epochs=2, seed=3)
    run = ss.torch_pruning_run if method == "torch-pruning" else ss.ln_structured_run
    for state in (1, 2):
        torch.manual_seed(state)
        with pytest.raises(StopIteration):
            run(cfg, data, data.test_x[:2])
    expected = ss.new_module(cfg, data).state_dict()
    assert all(torch.equal(seen[0][k], v) and torch.equal(seen[1][k], v) for k, v in expected.items())


def _run_fit_cost(tmp_path, monkeypatch, *args: str) -> list[dict]:
    """``benchmarks.fit_cost`` on LeNet-300-100 over 256 random images at batch 4 (64 steps), one epoch and one round,
    writing under ``tmp_path``; returns its rows."""
    import sys

    import torch

    from benchmarks import fit_cost

    torch.manual_seed(0)
    data = ImageData("tiny", torch.rand(256, 1, 28, 28), torch.arange(256) % 10, torch.rand(32, 1, 28, 28),
                     torch.randint(0, 10, (32,)))
    monkeypatch.setattr(fit_cost, "load_dataset", lambda name: data)
    monkeypatch.setattr(fit_cost, "OUT", tmp_path / "fit_cost.jsonl")
    monkeypatch.setattr(sys, "argv", ["fit_cost", "--models", "lenet300", "--batches", "4", "--epochs", "1",
                                      "--rounds", "1", *args])
    fit_cost.main()
    return store.read_rows(tmp_path / "fit_cost.jsonl")


def test_fit_cost_times_every_method_and_writes_the_table(tmp_path, monkeypatch):
    """The train-time benchmark fits dense, the defaults, structured DWF, the QAT finish, both with an offline W&B
    logger (the pictures rendered), and the factorized and gated models with no callback, alternately, and tabulates
    each ratio against the baseline of the same run."""
    from benchmarks import fit_cost

    (row,) = _run_fit_cost(tmp_path, monkeypatch, "--opts", "adamw", "--methods", *fit_cost.METHODS)
    assert set(row["seconds"]) == set(fit_cost.METHODS) and all(s > 0 for s in row["seconds"].values())
    assert {m: len(t) for m, t in row["round_seconds"].items()} == dict.fromkeys(fit_cost.METHODS, 1)
    lines = (tmp_path / "fit_cost.md").read_text().splitlines()
    line = next(x for x in lines if x.startswith("| lenet300 | adamw | 4 |"))
    assert "—" not in line and line.count("×") == len(fit_cost.COLUMNS)
    assert line.count("–") == len(fit_cost.COLUMNS)  # each ratio with the range of its rounds'


def test_fit_cost_fused_both_times_each_way_in_the_same_rounds(tmp_path, monkeypatch):
    """``--fused both`` fits every method with the default optimizer loop and with ``fused=True`` in each round, and
    writes one row per way; the table keeps them apart."""
    import torch
    from conftest import NO_FUSED_CPU, fused_on_cpu

    from benchmarks.models import Classifier

    if not fused_on_cpu(torch.optim.SGD):
        pytest.skip(NO_FUSED_CPU)
    built: list[bool] = []
    make = Classifier.make_optimizer

    def recording(self, params):
        optimizer = make(self, params)
        built.append(bool(optimizer.defaults.get("fused")))
        return optimizer

    monkeypatch.setattr(Classifier, "make_optimizer", recording)
    rows = _run_fit_cost(tmp_path, monkeypatch, "--opts", "sgd", "--methods", "dense", "dwf", "--fused", "both")
    assert [r.get("fused", False) for r in rows] == [False, True]
    assert all(r["interleaved"] == "both" and set(r["seconds"]) == {"dense", "dwf"} for r in rows)
    assert built == [False, False, True, True]  # one round: dense and DWF with the loop, then both fused
    lines = (tmp_path / "fit_cost.md").read_text().splitlines()
    assert any(x.startswith("| lenet300 | sgd | 4 |") for x in lines)
    assert any(x.startswith("| lenet300 | sgd (fused) | 4 |") for x in lines)


def test_fit_cost_ratio_is_the_median_of_the_rounds_ratios():
    """A ratio is the median over the rounds of the ratio within each round, with its range; a row without rounds
    (from before they were kept) gives the ratio of its medians."""
    from benchmarks.fit_cost import ratio

    row = {"seconds": {"dense": 2.0, "dwf": 3.0},
           "round_seconds": {"dense": [2.0, 1.0, 2.0], "dwf": [2.4, 1.5, 3.0]}}
    assert ratio(row, "dwf", "dense") == (1.5, (1.2, 1.5))
    del row["round_seconds"]
    assert ratio(row, "dwf", "dense") == (1.5, None)


def test_structured_speed_cell_averages_the_seeds_that_reached_the_budget():
    """A cell averages the seeds that reached the budget and trained, and says how many did not; "unreachable" or
    "diverged" only when none did."""
    from benchmarks.structured_speed import fmt

    run = {"acc": 0.9, "macs": 50.0, "dense_macs": 100.0, "speedup_b1": 1.5, "speedup_b64": 2.0}
    missed = {"error": "cannot reach 50% of dense MACs"}
    assert fmt([run]) == "90.00% · 0.50 MACs · 1.50× / 2.00×"
    assert fmt([run, dict(run, acc=0.8), dict(run, acc=0.7)]).startswith("80.00%³ · ")
    assert fmt([run, missed, missed]) == "90.00% (unreachable in 2 of 3 seeds) · 0.50 MACs · 1.50× / 2.00×"
    diverged = {"error": "torch-pruning diverged: non-finite weights after training"}
    assert fmt([diverged, run, run]).startswith("90.00% (2 seeds) (diverged in 1 of 3 seeds) · ")
    assert fmt([missed]) == "unreachable" and fmt([diverged]) == "diverged" and fmt([]) == "—"


@pytest.mark.parametrize("rule", ["min", "sqrt", "at-2rms"])
def test_factor_lr_rules_reshape_the_auto_multipliers(rule):
    """``--multiplier min`` / ``sqrt`` / ``at-2rms``: the library's per-layer SGD ``"auto"`` values, all set to the
    smallest, moved halfway (geometrically) to it, or lowered by 2^(2−2/D); a plain config plans as the library does."""
    import math

    import torch
    from torch import nn

    from benchmarks import factor_lr
    from lightning_dwf import FactorLRConfig, factor_parameters, factorize_
    from lightning_dwf.training import run
    from lightning_dwf.training.penalty import FactorPenalty

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 4))
    factorize_(net, depth=3)
    penalty = FactorPenalty(factor_parameters(net), lam=0.1, depth=3)
    penalty.bind([torch.optim.SGD(net.parameters(), lr=0.1)])
    auto = run.plan_multipliers(net, FactorLRConfig(), 3, penalty)
    assert auto["0.weight"] != auto["1.weight"]
    (cfg,) = factor_lr.plan("fashion-mnist-2k", "lenet5", "sgd", 64, [0.995], [rule], [0], epochs=40)
    assert cfg["epochs"] == 40
    (callback,) = methods.cell_callbacks(cfg)
    planned = run.plan_multipliers(net, callback.factor_lr, 3, penalty)
    low = min(auto.values())
    expected = {n: low if rule == "min" else math.sqrt(m * low) for n, m in auto.items()}
    if rule == "at-2rms":
        expected = {n: m / 2.0 ** (4 / 3) for n, m in auto.items()}
    assert planned == pytest.approx(expected)
    assert factor_lr._multiplier_argument(rule) == rule and factor_lr._multiplier_argument("2.5") == 2.5


def _recording_apply(applied: list[bool]) -> Callable[..., None]:
    """A stand-in for ``TrainingRun._apply_multipliers`` that records ``force`` and accepts only the calls the real
    method accepts (a fake with its own signature once hid the probes' calls going stale)."""
    import inspect

    from lightning_dwf.training.run import TrainingRun

    signature = inspect.signature(TrainingRun._apply_multipliers)

    def fake(*args: object, **kwargs: object) -> None:
        bound = signature.bind(None, *args, **kwargs)  # raises TypeError as the real method would
        bound.apply_defaults()
        applied.append(bound.arguments["force"])

    return fake


@pytest.mark.parametrize("mode", ["track-max", "track-rms"])
def test_factor_lr_tracking_rules_lower_the_multiplier_as_weights_grow(mode):
    """``track-*``: the DWF callback plus a callback that, every TRACK_EVERY steps, lowers a tensor's SGD multiplier
    as its weights grow (track-max: by the growth of max|w| to the power −(2−2/D)) and never raises it."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from benchmarks import factor_lr
    from lightning_dwf import DWFCallback, factorize_

    (cfg,) = factor_lr.plan("fashion-mnist", "lenet5", "sgd", 64, [0.995], [mode], [0])
    dwf, track = methods.cell_callbacks(cfg)
    assert isinstance(dwf, DWFCallback) and track.dwf is dwf and track.mode == mode
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    factorize_(net, depth=3)
    applied = []
    run = SimpleNamespace(multipliers={"0.weight": 40.0}, depth=3, ctx=None,
                          penalty=SimpleNamespace(kind_of=lambda factor: "gradient"),
                          _apply_multipliers=_recording_apply(applied))
    dwf._run = run
    track.on_train_batch_end(SimpleNamespace(global_step=methods.TRACK_EVERY), net)
    first = run.multipliers["0.weight"]
    assert first <= 40.0 and applied == [True]
    with torch.no_grad():
        net[0].parametrizations.weight.original0.mul_(2.0)  # w doubles
    track.on_train_batch_end(SimpleNamespace(global_step=methods.TRACK_EVERY + 1), net)  # not due: unchanged
    assert run.multipliers["0.weight"] == first and applied == [True]
    track.on_train_batch_end(SimpleNamespace(global_step=2 * methods.TRACK_EVERY), net)
    if mode == "track-max":
        assert first == 40.0 and run.multipliers["0.weight"] == pytest.approx(40.0 * 2.0 ** (-4 / 3))
    else:
        assert run.multipliers["0.weight"] == pytest.approx(min(40.0, first * 2.0 ** (-4 / 3)), rel=1e-4)


@pytest.mark.parametrize(("mode", "ramp", "recovery"), [("ramp-half", 0.5, 1.0), ("recovery-double", 1.0, 2.0)])
def test_factor_lr_phase_rules_scale_the_plan_before_and_after_the_recovery_point(mode, ramp, recovery):
    """``ramp-half`` / ``recovery-double``: the planned multipliers times the ramp factor from the first step, times
    the recovery factor once target mode's recovery has begun, each applied once (the warm-up ramp restarts there)."""
    from types import SimpleNamespace

    from torch import nn

    from benchmarks import factor_lr

    (cfg,) = factor_lr.plan("fashion-mnist", "lenet5", "adamw", 256, [0.9], [mode], [0])
    dwf, phases = methods.cell_callbacks(cfg)
    applied = []
    regime = SimpleNamespace(recovering=False)
    run = SimpleNamespace(multipliers={"a": 10.0, "b": 4.0}, depth=3, regime=regime, ctx=SimpleNamespace(step=0),
                          penalty=SimpleNamespace(),
                          _apply_multipliers=_recording_apply(applied))
    dwf._run = run
    trainer, net = SimpleNamespace(global_step=1), nn.Linear(2, 2)
    phases.on_train_batch_end(trainer, net)
    assert run.multipliers == {"a": 10.0 * ramp, "b": 4.0 * ramp} and applied == [True]
    phases.on_train_batch_end(trainer, net)  # still in the ramp: nothing new
    assert run.multipliers == {"a": 10.0 * ramp, "b": 4.0 * ramp} and applied == [True]
    regime.recovering = True
    phases.on_train_batch_end(trainer, net)
    phases.on_train_batch_end(trainer, net)
    assert run.multipliers == {"a": 10.0 * recovery, "b": 4.0 * recovery} and applied == [True, True]


def test_factor_lr_recut_rule_replans_from_the_survivors_at_the_recovery_point():
    """``recut-rms``: nothing before the recovery point; there each tensor's multiplier from the RMS of its non-zero
    weights (SGD: ``"auto"`` of it; Adam-type: ``1/(D·rms^(1−1/D))``), once."""
    from types import SimpleNamespace

    import torch
    from torch import nn

    from benchmarks import factor_lr
    from lightning_dwf import factorize_
    from lightning_dwf.core.factorize import factorized_tensors
    from lightning_dwf.core.functional import auto_lr_multiplier

    (cfg,) = factor_lr.plan("fashion-mnist", "lenet5", "sgd", 256, [0.9], ["recut-rms"], [0])
    dwf, recut = methods.cell_callbacks(cfg)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.Linear(8, 4))
    factorize_(net, depth=3)
    with torch.no_grad():
        net[0].parametrizations.weight.original0[:4].zero_()  # half the first layer's rows cut
    first, second = factorized_tensors(net)
    kinds = {id(first.factors[0]): "gradient", id(second.factors[0]): "decoupled"}
    applied = []
    regime = SimpleNamespace(recovering=False)
    run = SimpleNamespace(multipliers={"0.weight": 7.0, "1.weight": 5.0}, depth=3, regime=regime,
                          ctx=SimpleNamespace(step=9), penalty=SimpleNamespace(kind_of=lambda f: kinds[id(f)]),
                          _apply_multipliers=_recording_apply(applied))
    dwf._run = run
    recut.on_train_batch_end(SimpleNamespace(global_step=9), net)
    assert run.multipliers == {"0.weight": 7.0, "1.weight": 5.0} and applied == []
    regime.recovering = True
    recut.on_train_batch_end(SimpleNamespace(global_step=10), net)
    recut.on_train_batch_end(SimpleNamespace(global_step=11), net)
    rms = [float(w[w != 0].pow(2).mean().sqrt()) for w in (net[0].weight.detach(), net[1].weight.detach())]
    assert run.multipliers["0.weight"] == pytest.approx(auto_lr_multiplier(rms[0], 3, "gradient"))
    assert run.multipliers["1.weight"] == pytest.approx(1.0 / (3 * rms[1] ** (2 / 3)))
    assert applied == [True]


def test_factor_lr_adam_auto_sets_the_adam_type_auto_value_and_marks_the_rows(tmp_path, monkeypatch):
    """``--adam-auto``: the rows carry it in their config (so they are not mistaken for the library's "auto"), and the
    run plans from it."""
    from benchmarks import factor_lr
    from lightning_dwf.core import functional

    (cfg,) = factor_lr.plan("fashion-mnist", "lenet5", "adamw", 256, [0.9], ["ramp-half"], [0], adam_auto=10.0)
    assert cfg["adam_auto"] == 10.0
    assert "adam_auto" not in factor_lr.plan("fashion-mnist", "lenet5", "adamw", 256, [0.9], [5.0], [0])[0]
    monkeypatch.setattr(functional, "DECOUPLED_AUTO_MULTIPLIER", functional.DECOUPLED_AUTO_MULTIPLIER)
    seen = []
    monkeypatch.setattr(factor_lr, "run_plan", lambda configs, *a: seen.extend(configs) or {})
    monkeypatch.setattr(factor_lr, "load_rows", lambda path: {})
    factor_lr.main(["--opt", "adamw", "--multiplier", "ramp-half", "--adam-auto", "10", "--results",
                    str(tmp_path / "rows.jsonl")])
    assert functional.auto_lr_multiplier(0.05, 3, "decoupled") == 10.0
    assert [c["adam_auto"] for c in seen] == [10.0]


def test_structured_lam_rows_shrink_the_model_and_render(tmp_path, monkeypatch):
    """``benchmarks.structured_lam``: a constant λ large enough removes whole neurons (the shrunk model has fewer MACs
    than dense, its outputs equal to the collapsed model's), a refused λ is an error row, and the report has a line per
    row and recovery. A few hundred images, two epochs."""
    import torch

    from benchmarks import structured_lam as sl
    from benchmarks import structured_speed as ss

    torch.manual_seed(0)
    data = ImageData("tiny", torch.rand(512, 1, 28, 28), torch.arange(512) % 10, torch.rand(64, 1, 28, 28),
                     torch.randint(0, 10, (64,)))
    monkeypatch.setattr(ss, "BATCH_SIZE", 16)
    small, large, refused = (sl.run_cell(dict(model="lenet300", opt="adamw", lam=lam, epochs=2, seed=0), data)
                             for lam in (0.01, 1.0, 200.0))  # 200: lr × multiplier × 2λ/D > 1, refused at train start
    assert small["macs"] == small["dense_macs"] and large["macs"] < large["dense_macs"]
    assert large["shrink_max_abs_diff"] < 1e-4 and 0.0 <= large["acc"] <= 1.0
    assert "error" in refused and "lam" in refused["error"]
    out = tmp_path / "lam.jsonl"
    store.append_rows(out, [small, large, refused])
    table = sl.write_report(out).splitlines()
    assert len(table) == 5 and table[2].startswith("| lenet300 | adamw | 0 | 0.01 | 1.000 | 1.000 |")
    assert table[4].startswith("| lenet300 | adamw | 0 | 200 | ") and out.with_suffix(".md").exists()
    ramped = dict(large, recovery=0.5)  # the ramp's row is another run, with its own line
    assert sl.key(ramped) != sl.key(large)
    store.append_rows(out, [ramped])
    assert "| lenet300 | adamw | 0.5 | 1 | " in sl.write_report(out)


def test_mha_shrink_rows_time_the_three_forms_and_render():
    """``benchmarks.mha_shrink``: half of every layer's heads go (4 of 8 left, 0.83 of the Linear MACs), the three
    forms are timed (outputs checked equal inside), and the table has a line per (fraction, batch)."""
    from benchmarks import mha_shrink as ms

    (row,) = ms.measure([0.5], [2], rounds=1, min_run_time=0.01, seed=0)
    assert row["heads_left"] == [4] and row["macs_ratio"] == pytest.approx(10 / 12, rel=1e-3)
    assert set(row["ms"]) == {"unshrunk", "rewritten", "shrunk"} and all(v > 0 for v in row["ms"].values())
    table = ms.table([row]).splitlines()
    assert len(table) == 7 and table[-1].startswith("| 50% | 2 | ")


def test_identity_compare_counts_nan_metrics_equal_and_names_what_differs():
    """A file compared with itself is bit-identical even where a diverged step logged NaN; a changed weight or metric
    is named."""
    import torch

    from benchmarks import identity

    logged = [(5, {"dwf/misalignment": float("nan"), "dwf/lam": 1e-3})]
    run = {"state": {"w": torch.tensor([1.0, float("nan")])}, "logged": logged, "error": ""}
    assert identity.compare({"a": run}, {"a": dict(run, logged=[(5, dict(logged[0][1]))])}) == []
    changed = dict(run, state={"w": torch.tensor([2.0, float("nan")])}, logged=[(5, {**logged[0][1], "dwf/lam": 0.0})])
    assert identity.compare({"a": run}, {"a": changed}) == ["a: w differs", "a: logged metrics differ"]


def test_gradient_lam_probe_recovers_the_collapsed_gradient_and_calibrates_after_its_steps():
    """The probe of benchmarks.gradient_lam: the collapsed weight's gradient from the factors' gradients equals
    autograd's, and λ stays 0 until the calibration steps are done, then each tensor gets its calibrated λ."""
    import torch
    from torch import nn

    from benchmarks import gradient_lam
    from lightning_dwf import FactorLRConfig, TrainingRun, factorize_
    from lightning_dwf.training.regimes import build_regime

    torch.manual_seed(0)
    factors = [nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    x = torch.randn(5, 3)
    w = factors[0] * factors[1] * factors[2]
    w.retain_grad()
    (x @ w.T).pow(2).sum().backward()
    assert torch.allclose(gradient_lam.collapsed_gradient(factors), w.grad, rtol=1e-4, atol=1e-6)

    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    factorize_(net, depth=3)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    run = TrainingRun(build_regime(gradient_lam.GradientLamConfig(0.1, recovery=0.5, calibrate_steps=3)), depth=3,
                      factor_lr=FactorLRConfig(check="off", warmup=0.0))
    run.bind(net, [opt], step=0, total_steps=20)
    run.start(net, [opt], step=0, total_steps=20)
    for step in range(5):
        run.before_batch(net, [opt], step, 20)
        assert (run.regime.lam > 0) == (step >= 3)  # λ = 0 during the 3 calibration steps
        opt.zero_grad()
        nn.functional.cross_entropy(net(torch.randn(8, 6)), torch.randint(0, 2, (8,))).backward()
        run.before_step(net, opt)
        opt.step()
        run.after_batch(net, [opt], step + 1)
    scales = run.regime.lam_scales()
    assert set(scales) == {"0.weight", "2.weight"} and max(scales.values()) == 1.0
    assert gradient_lam.plan("vit", [0.1])[0]["method"] == "dwf-gradlam"


@pytest.mark.parametrize("rule", methods.MULTIPLIER_RULES)
def test_factor_lr_probe_rules_train_to_their_target(rule, tmp_path, monkeypatch):
    """Every probe rule of ``benchmarks.factor_lr`` (they reach into the run's internals) trains a BatchNorm CNN cell
    to its target: a rule broken by a change of those internals fails here, not in a long probe."""

    from benchmarks import factor_lr, matrix

    data = _random_images(160, 32)
    (cfg,) = factor_lr.plan("fashion-mnist", "cnn-bn", "sgd", 64, [0.9], [rule], [0])
    cfg = dict(cfg, batch_size=8, epochs=4)  # 80 steps (target mode plans at least 50)
    if rule in methods.ALLOCATED_CUTS:  # ModelPruning's allocation in the same cell and seed
        peer = dict(cfg, method="model-pruning")
        del peer["factor_lr_multiplier"]
        counts = {"0": 100, "4": 1000, "9": 14500, "11": 655}
        monkeypatch.setattr(matrix, "PATH", tmp_path / "matrix.jsonl")
        matrix.PATH.write_text(json.dumps(dict(config=peer, results=dict(layer_nonzeros=counts))) + "\n")
    rows = runs.run_plan([cfg], tmp_path / "factor_lr.jsonl", loader=lambda name, root: data)
    res = rows[store.key(cfg)]["results"]
    assert res["acc"] is not None and res["sparsity"] == pytest.approx(0.9, abs=1e-3) and not res["emptied"]
    if rule in methods.ALLOCATED_CUTS:
        total = sum(counts.values())
        kept = {n: round(c / total * res["nonzero"]) for n, c in counts.items()}
        assert all(abs(res["layer_nonzeros"][n] - k) <= 1 for n, k in kept.items()), (res["layer_nonzeros"], kept)
