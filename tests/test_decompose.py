"""Quantized sparse weight decomposition: PGD quality, exact budgets and grids, fine-tuning, file round trips."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf import factorize_
from lightning_dwf.core.functional import quantize_to_grid
from lightning_dwf.decompose.decompose import (
    DecomposeConfig,
    LowRankProduct,
    collapse_decomposed_,
    decompose_,
    decompose_matrix,
    decomposed_tensors,
    finetune_,
    load_decomposed,
    save_decomposed,
)
from lightning_dwf.export.compressed import load_compressed, save_compressed

KINDS = ["linear", "conv1d", "conv2d"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: intra-op threads only add synchronization (and contention on a shared machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
CONFIG = dict(rank_ratio=0.5, density=0.5, steps=60, min_size=0)


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "linear":
        return nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 10))
    if kind == "conv1d":
        return nn.Sequential(nn.Conv1d(4, 16, 5), nn.ReLU(), nn.Conv1d(16, 8, 3))
    return nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3, bias=False))


def inputs(kind: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (n, 40), "conv1d": (n, 4, 12), "conv2d": (n, 3, 7, 7)}[kind]
    return torch.randn(shape, generator=g)


def low_rank_plus_noise(rows: int = 48, cols: int = 64, rank: int = 10, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=g) @ torch.randn(rank, cols, generator=g) / rank**0.5 + 0.1 * torch.randn(
        rows, cols, generator=g
    )


def assert_on_grid(x: torch.Tensor, bits: int) -> None:
    """Every row of ``x`` is an integer multiple of ``rowmax / qmax`` within float rounding, |q| <= qmax."""
    qmax = 2 ** (bits - 1) - 1
    x = x.detach().double()
    scale = x.abs().amax(dim=1, keepdim=True) / qmax
    q = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    assert torch.allclose(q, q.round(), rtol=0, atol=1e-4)
    assert int(q.round().abs().max()) <= qmax
    assert torch.equal(quantize_to_grid(x, bits).ne(0), x.ne(0))  # re-rounding keeps the pattern


# ------------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=4, rank_ratio=0.5), "rank_ratio"),
        (dict(rank_ratio=0.0), "rank_ratio"),
        (dict(rank_ratio=1.5), "rank_ratio"),
        (dict(density=0.0), "density"),
        (dict(density=1.01), "density"),
        (dict(density=float("nan")), "density"),
        (dict(bits=3), "bits"),
        (dict(bits=True), "bits"),
        (dict(steps=-1), "steps"),
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(min_size=-1), "min_size"),
        (dict(layer_types=["NotALayer"]), "layer_types"),
    ],
)
def test_bad_config_raises_value_error_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"`{field}`"):
        DecomposeConfig(**kwargs)


def test_config_types_and_rank_rule() -> None:
    with pytest.raises(TypeError, match="`rank`"):
        DecomposeConfig(rank=2.5)
    with pytest.raises(TypeError, match="`filter_fn`"):
        DecomposeConfig(filter_fn="no")
    assert DecomposeConfig().rank_for(300, 784) == 75
    assert DecomposeConfig(rank=1000).rank_for(300, 784) == 300
    assert DecomposeConfig(rank_ratio=0.001).rank_for(300, 784) == 1
    assert DecomposeConfig(exclude="head").exclude == ("head",)
    assert DecomposeConfig(density=0.29).keep_for(100) == 29  # no float floor surprise (0.29 * 100 = 28.999…)


# ---------------------------------------------------------------------------------------------------- the PGD


@pytest.mark.parametrize("bits", [None, 8, 4])
def test_pgd_lowers_the_error_and_beats_projected_svd(bits: int | None) -> None:
    w = low_rank_plus_noise()
    d = decompose_matrix(w, rank=10, keep_u=48 * 10 // 4, keep_v=10 * 64 // 4, bits=bits, steps=150)
    err = float(torch.linalg.matrix_norm(w - d.u @ d.v) / torch.linalg.matrix_norm(w))
    assert err == pytest.approx(d.error, rel=1e-4)
    assert d.svd_error < d.error < 0.97 * d.init_error  # the naive baseline: magnitude-sparsified (quantized) SVD
    assert min(d.errors[:20]) > d.error or d.errors.index(d.error) < 20  # still improving after 20 steps, or done
    if bits is None:  # exact projection onto the sparse set: iterative hard thresholding never increases f
        assert all(b <= a * (1 + 1e-5) for a, b in zip(d.errors, d.errors[1:]))
    assert int(d.u.count_nonzero()) <= 120 and int(d.v.count_nonzero()) <= 160
    if bits is not None:
        assert_on_grid(d.u, bits)
        assert_on_grid(d.v, bits)


def test_pgd_with_a_fixed_step_and_zero_steps() -> None:
    w = low_rank_plus_noise()
    fixed = decompose_matrix(w, rank=10, keep_u=120, keep_v=160, steps=50, lr=0.05)
    assert fixed.error < fixed.init_error
    none = decompose_matrix(w, rank=10, keep_u=120, keep_v=160, steps=0)
    assert len(none.errors) == 1 and none.error == none.init_error
    with pytest.raises(ValueError, match="`rank`"):
        decompose_matrix(w, rank=0, keep_u=1, keep_v=1)
    with pytest.raises(ValueError, match="NaN"):
        decompose_matrix(torch.full((4, 4), float("nan")), rank=2, keep_u=2, keep_v=2)


# ------------------------------------------------------------------------------------------------- decompose_


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_decompose_respects_density_grid_and_forward(kind: str, bits: int | None) -> None:
    model = build(kind)
    x = inputs(kind)
    dense_out = model(x)
    config = DecomposeConfig(bits=bits, **CONFIG)
    report = decompose_(model, config)
    assert report.names == ("0.weight", "2.weight") and not report.skipped
    for row, t in zip(report.layers, decomposed_tensors(model)):
        u, v = t.factors()
        assert isinstance(t.parametrization, LowRankProduct) and isinstance(t.module, (nn.Linear, nn.Conv1d, nn.Conv2d))
        assert row.nonzero_u == int(u.count_nonzero()) <= config.density * u.numel()
        assert row.nonzero_v == int(v.count_nonzero()) <= config.density * v.numel()
        assert row.rank == u.shape[1] == v.shape[0] == config.rank_for(*row.matrix)
        assert torch.equal(t.module.weight, (u @ v).reshape(row.shape))
        assert row.svd_error <= row.error < row.init_error
        assert 0 < row.stored_bytes < row.dense_bytes == 4 * t.module.weight.numel()
        if bits is not None:
            assert_on_grid(u, bits)
            assert_on_grid(v, bits)
    out = model(x)
    assert out.shape == dense_out.shape and torch.isfinite(out).all()
    assert 0 < report.error < 1 and report.nonzeros == sum(r.nonzero_u + r.nonzero_v for r in report.layers)


def test_decompose_selection_and_skips() -> None:
    model = build("linear")
    report = decompose_(model, DecomposeConfig(exclude=["2"], min_size=0, density=0.5, steps=5))
    assert report.names == ("0.weight",) and type(model[2].weight) is nn.Parameter
    again = decompose_(model, DecomposeConfig(min_size=0, density=0.5, steps=5))
    assert again.skipped[0] == ("0.weight", "already decomposed") and again.names == ("2.weight",)
    tiny = decompose_(build("linear"), DecomposeConfig(steps=5, min_size=2000))
    assert not tiny.layers and "min_size" in tiny.skipped[0][1]
    full = decompose_(build("linear"), DecomposeConfig(rank_ratio=1.0, density=1.0, min_size=0, steps=5))
    assert not full.layers and all("dense weight" in reason for _, reason in full.skipped)
    dwf = build("linear")
    factorize_(dwf, depth=2)
    with pytest.raises(ValueError, match=r"collapse_\(module\)"):
        decompose_(dwf, DecomposeConfig(min_size=0))


def test_collapse_decomposed_gives_back_plain_layers() -> None:
    model = build("conv2d")
    decompose_(model, DecomposeConfig(bits=4, **CONFIG))
    x = inputs("conv2d")
    out = model(x)
    twin = copy.deepcopy(model)
    collapse_decomposed_(model)
    assert type(model[0]) is nn.Conv2d and set(model.state_dict()) == {"0.weight", "0.bias", "2.weight"}
    torch.testing.assert_close(model(x), out)
    torch.testing.assert_close(twin(x), out)  # the deepcopy keeps working
    assert decomposed_tensors(twin) and not decomposed_tensors(model)


# ------------------------------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("bits", [None, 4])
def test_finetune_keeps_masks_and_grid(bits: int | None) -> None:
    model = build("linear")
    decompose_(model, DecomposeConfig(bits=bits, **CONFIG))
    before = {t.name: t.factors() for t in decomposed_tensors(model)}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 40, generator=g)
    data = DataLoader(TensorDataset(x, torch.randint(0, 10, (64,), generator=g)), batch_size=16)
    losses = finetune_(model, data, nn.functional.cross_entropy, epochs=2, lr=1e-2)
    assert len(losses) == 2 and losses[1] < losses[0]
    for t in decomposed_tensors(model):
        u, v = t.factors()
        u0, v0 = before[t.name]
        assert not torch.equal(u, u0)  # it trained
        assert not (u.ne(0) & u0.eq(0)).any() and not (v.ne(0) & v0.eq(0)).any()  # no entry outside the masks
        assert not (t.u.detach().ne(0) & ~t.parametrization.mask_u).any()  # pruned raw entries never moved
        if bits is not None:
            assert_on_grid(u, bits)
            assert_on_grid(v, bits)
        assert torch.equal(t.module.weight, (u @ v).reshape(t.module.weight.shape))
    assert model.training
    assert len(finetune_(model.eval(), data, nn.functional.cross_entropy, max_steps=2)) == 1 and not model.training


# ------------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_save_load_round_trip(tmp_path, kind: str, bits: int | None) -> None:
    model = build(kind)
    decompose_(model, DecomposeConfig(bits=bits, **CONFIG))
    x = inputs(kind)
    out = model(x)
    path = tmp_path / "qsd.safetensors"
    report = save_decomposed(model, path)
    assert report.file_bytes == os.path.getsize(path) and report.bits == bits
    assert report.layers == ("0.weight", "2.weight")
    assert report.dense_bytes == sum(t.numel() * 4 for t in build(kind).state_dict().values())
    assert report.ratio == report.dense_bytes / report.file_bytes  # tiny models: the header dominates
    stored = {t.name for t in report.compressed.tensors}
    assert {"0.weight.qsd_u", "0.weight.qsd_v", "2.weight.qsd_u"} <= stored and "0.weight" not in stored
    fresh = build(kind, seed=5)
    load_decomposed(path, fresh)
    assert [t.name for t in decomposed_tensors(fresh)] == ["0.weight", "2.weight"]
    torch.testing.assert_close(fresh(x), out, rtol=1e-5, atol=1e-6)
    plain = load_decomposed(path, build(kind, seed=6), collapse=True)
    assert not decomposed_tensors(plain)
    torch.testing.assert_close(plain(x), out, rtol=1e-5, atol=1e-6)
    for t, s in zip(decomposed_tensors(model), decomposed_tensors(fresh)):  # same masks: fine-tuning can go on
        assert torch.equal(t.parametrization.mask_u, s.parametrization.mask_u)


def test_save_keeps_dense_layers_and_refuses_mismatches(tmp_path) -> None:
    model = build("linear")
    decompose_(model, DecomposeConfig(bits=None, exclude=["2"], **CONFIG))
    path = tmp_path / "qsd.safetensors"
    save_decomposed(model, path)
    fresh = load_decomposed(path, build("linear", seed=3))
    x = inputs("linear")
    torch.testing.assert_close(fresh(x), model(x))
    assert torch.equal(fresh[2].weight, model[2].weight)  # lossless dense layer
    with pytest.raises(ValueError, match="does not match the module"):
        load_decomposed(path, nn.Sequential(nn.Linear(40, 16), nn.ReLU(), nn.Linear(16, 10)))
    with pytest.raises(ValueError, match="parametrized"):
        load_decomposed(path, fresh)
    with pytest.raises(ValueError, match="the file has no '0.weight'"):
        load_compressed(path, build("linear"))
    with pytest.raises(ValueError, match="no decomposed tensor"):
        save_decomposed(build("linear"), path)
    with pytest.raises(ValueError, match="save_decomposed"):
        save_compressed(model, tmp_path / "x.safetensors")
    plain_path = tmp_path / "plain.safetensors"
    save_compressed(build("linear"), plain_path)
    with pytest.raises(ValueError, match="not written by save_decomposed"):
        load_decomposed(plain_path, build("linear"))
    with pytest.raises(FileNotFoundError):
        load_decomposed(tmp_path / "missing.safetensors", build("linear"))
