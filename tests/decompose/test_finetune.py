"""finetune_: the masks and the grid hold whatever the optimizer; the user's optimizer or the default Adam."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dwf.decompose import DecomposeConfig, decompose_, decomposed_tensors, finetune_

from .helpers import CONFIG, assert_on_grid, build


def loader(n: int = 64, seed: int = 2) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 40, generator=g)
    return DataLoader(TensorDataset(x, torch.randint(0, 10, (n,), generator=g)), batch_size=16)


def decomposed(bits: int | None = 8) -> nn.Module:
    model = build("linear")
    decompose_(model, DecomposeConfig(bits=bits, **CONFIG))
    return model


def assert_masks_hold(model: nn.Module, before: dict, bits: int | None) -> None:
    for t in decomposed_tensors(model):
        u, v = t.factors()
        u0, v0 = before[t.name]
        assert not torch.equal(u, u0)  # it trained
        assert not (u.ne(0) & u0.eq(0)).any() and not (v.ne(0) & v0.eq(0)).any()  # no entry outside the masks
        assert not (t.u.detach().ne(0) & ~t.parametrization.mask_u).any()  # pruned raw entries never moved
        assert not (t.v.detach().ne(0) & ~t.parametrization.mask_v).any()
        if bits is not None:
            assert_on_grid(u, bits)
            assert_on_grid(v, bits)
        assert torch.equal(t.module.weight, (u @ v).reshape(t.module.weight.shape))


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


@pytest.mark.parametrize("bits", [None, 4])
def test_finetune_with_the_users_sgd_trains_and_keeps_the_masks(bits: int | None) -> None:
    model = decomposed(bits)
    before = {t.name: t.factors() for t in decomposed_tensors(model)}
    sgd = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    losses = finetune_(model, loader(), nn.functional.cross_entropy, sgd, epochs=3)
    assert len(losses) == 3 and losses[2] < losses[0]
    assert_masks_hold(model, before, bits)
    assert sgd.state  # the user's optimizer is the one that stepped (momentum buffers)


def test_default_adam_is_bit_identical_to_an_explicit_one() -> None:
    for lr, kwargs in ((1e-2, dict(lr=1e-2)), (1e-4, {})):  # an explicit lr, and the default 1e-4
        default = decomposed()
        explicit, factory = copy.deepcopy(default), copy.deepcopy(default)
        losses = finetune_(default, loader(), nn.functional.cross_entropy, epochs=2, **kwargs)
        adam = torch.optim.Adam([p for p in explicit.parameters() if p.requires_grad], lr=lr)
        assert finetune_(explicit, loader(), nn.functional.cross_entropy, adam, epochs=2) == losses
        def build_adam(params: list[nn.Parameter], lr: float = lr) -> torch.optim.Optimizer:
            return torch.optim.Adam(params, lr=lr)

        assert finetune_(factory, loader(), nn.functional.cross_entropy, build_adam, epochs=2) == losses
        for other in (explicit, factory):
            state, expected = other.state_dict(), default.state_dict()
            assert state.keys() == expected.keys()
            assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_wrong_optimizer_is_refused_before_training() -> None:
    model = decomposed()
    state = copy.deepcopy(model.state_dict())
    data, loss = loader(), nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"`optimizer`.*`lr`"):
        finetune_(model, data, loss, torch.optim.SGD(model.parameters(), lr=0.1), lr=1e-3)
    with pytest.raises(ValueError, match="holds none of the module's trainable parameters.*after decompose_"):
        finetune_(model, data, loss, torch.optim.SGD(build("linear").parameters(), lr=0.1))
    stale = build("linear")
    early = torch.optim.SGD(stale.parameters(), lr=0.1)  # built before decompose_: holds the replaced weights
    decompose_(stale, DecomposeConfig(**CONFIG))
    with pytest.raises(ValueError, match="holds none of the module's trainable factors"):
        finetune_(stale, data, loss, early)
    with pytest.raises(TypeError, match="`optimizer`"):
        finetune_(model, data, loss, "adam")
    with pytest.raises(TypeError, match="must return a torch.optim.Optimizer"):
        finetune_(model, data, loss, lambda params: None)
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)  # nothing trained
