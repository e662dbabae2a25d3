"""LinearMultiheadAttention computes nn.MultiheadAttention's function (outputs and weights) for every call form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_dwf.inference.attention import LinearMultiheadAttention

N, L, S, E, H = 3, 5, 7, 16, 4


def masks() -> dict[str, dict]:
    padding = torch.zeros(N, S, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.triu(torch.ones(L, S, dtype=torch.bool), 1)
    per_head = torch.randn(N * H, L, S, generator=torch.Generator().manual_seed(1))
    return {
        "none": {},
        "no_weights": {"need_weights": False},
        "padding": {"key_padding_mask": padding},
        "causal_sdpa": {"attn_mask": causal, "need_weights": False, "is_causal": True},
        "per_head_float": {"attn_mask": per_head, "key_padding_mask": padding.float() * -1e4},
        "per_head_weights": {"attn_mask": causal, "average_attn_weights": False},
    }


@pytest.mark.parametrize("call", list(masks()))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_it_equals_the_module_it_was_built_from(call, batch_first, bias):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first).eval()
    linear = LinearMultiheadAttention.from_mha(mha)
    query, memory = torch.randn(N, L, E), torch.randn(N, S, E)
    if not batch_first:
        query, memory = query.transpose(0, 1), memory.transpose(0, 1)
    expected, expected_weights = mha(query, memory, memory, **masks()[call])
    got, weights = linear(query, memory, memory, **masks()[call])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    if expected_weights is None:
        assert weights is None
    else:
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)


def test_unbatched_inputs_and_the_refused_forms():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H).eval()
    x = torch.randn(L, E)
    expected, expected_weights = mha(x, x, x)
    got, weights = LinearMultiheadAttention.from_mha(mha)(x, x, x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    with pytest.raises(RuntimeError, match="attn_mask"):
        LinearMultiheadAttention.from_mha(mha)(x, x, x, is_causal=True)
    for kwargs in ({"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 8, "vdim": 8}):
        with pytest.raises(ValueError, match="kdim = vdim = embed_dim"):
            LinearMultiheadAttention.from_mha(nn.MultiheadAttention(E, H, **kwargs))


def test_training_mode_and_dropout_follow_the_module():
    mha = nn.MultiheadAttention(E, H, dropout=0.5).train()
    linear = LinearMultiheadAttention.from_mha(mha)
    assert linear.training and linear.dropout == 0.5
    x = torch.randn(L, N, E)
    torch.manual_seed(0)
    first = linear(x, x, x, need_weights=False)[0]
    assert not torch.allclose(first, linear.eval()(x, x, x, need_weights=False)[0])  # dropout acts in training only
