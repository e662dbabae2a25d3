"""``nn.MultiheadAttention`` rewritten with one ``nn.Linear`` per projection, so that its heads can be removed.

``nn.MultiheadAttention`` packs q, k and v into one ``in_proj_weight`` and ties its inner width to ``embed_dim``, which
is also its output width: a head cannot leave it. :class:`LinearMultiheadAttention` computes the same function with
``q``/``k``/``v``/``out`` Linear layers and a ``num_heads`` count, deriving every width from the projections, so the
shrink (:func:`~lightning_dwf.shrink_`) removes a silent head's rows of q, k and v and its columns of ``out`` through
Torch-Pruning's graph like any attention written with Linear layers, and lowers ``num_heads``. It takes
``nn.MultiheadAttention``'s call (masks, ``need_weights``, ``batch_first``, unbatched inputs) and returns the same
``(output, weights)``; ``nn.TransformerEncoderLayer`` and friends call it through their ordinary (non-fused) path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class LinearMultiheadAttention(nn.Module):
    """Multi-head attention with separate Linear projections: the function of the ``nn.MultiheadAttention`` it was
    built from (:meth:`from_mha`), in a form whose heads can be removed.

    After a shrink the returned attention weights (``need_weights=True``) are those of the kept heads, and a per-head
    ``attn_mask`` (``(N·num_heads, L, S)``) must be given for the kept heads.

    Attributes:
        num_heads: the head count (lowered when heads are removed).
        batch_first: inputs and outputs are ``(N, L, E)`` instead of ``(L, N, E)``.
        dropout: dropout probability on the attention weights, in training.
    """

    #: Read by ``nn.Transformer*Layer`` to choose their fused kernel: ``False`` sends them through ``forward``.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 batch_first: bool = False) -> None:
        super().__init__()
        self.num_heads, self.batch_first, self.dropout = num_heads, batch_first, dropout
        self.q, self.k, self.v = (nn.Linear(embed_dim, embed_dim, bias=bias) for _ in range(3))
        self.out = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    @torch.no_grad()
    def from_mha(cls, mha: nn.MultiheadAttention) -> LinearMultiheadAttention:
        """The same function as ``mha``, its weights copied (same dtype and device).

        Raises:
            ValueError: a form this class does not reproduce (separate ``kdim``/``vdim``, ``add_bias_kv``,
                ``add_zero_attn``).
        """
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("only nn.MultiheadAttention with kdim = vdim = embed_dim, add_bias_kv=False and "
                             "add_zero_attn=False can be rewritten with Linear projections.")
        embed = mha.embed_dim
        new = cls(embed, mha.num_heads, mha.dropout, mha.in_proj_bias is not None, mha.batch_first)
        new.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        for i, proj in enumerate((new.q, new.k, new.v)):
            proj.weight.copy_(mha.in_proj_weight[i * embed:(i + 1) * embed])
            if mha.in_proj_bias is not None:
                proj.bias.copy_(mha.in_proj_bias[i * embed:(i + 1) * embed])
        new.out.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``'s arguments and result (``is_causal`` is a hint: ``attn_mask`` is what
        masks, and must be given with it, as there)."""
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention).")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # batch first inside
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        batch, length = query.shape[:2]
        q, k, v = (self._heads(proj(x)) for proj, x in ((self.q, query), (self.k, key), (self.v, value)))
        mask = self._mask(attn_mask, key_padding_mask, q, batch, length, k.shape[2])
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
            weights = torch.softmax(scores if mask is None else scores + mask, dim=-1)
            attended = F.dropout(weights, dropout) @ v if dropout else weights @ v
        else:
            weights = None
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out(attended.transpose(1, 2).reshape(batch, length, -1))  # (N, L, E)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _heads(self, x: Tensor) -> Tensor:
        """``(N, T, heads·d)`` → ``(N, heads, T, d)``."""
        batch, length = x.shape[:2]
        return x.reshape(batch, length, self.num_heads, -1).transpose(1, 2)

    def _mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, q: Tensor, batch: int, length: int,
              source: int) -> Tensor | None:
        """One additive float mask broadcastable to ``(N, heads, L, S)`` (boolean masks: True is masked out)."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            mask = mask.reshape(batch, self.num_heads, length, source) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            padding = _additive(key_padding_mask, q.dtype).reshape(batch, 1, 1, source)
            mask = padding if mask is None else mask + padding
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: masked out) as 0 / −inf, a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


def rewrite_attention_(model: nn.Module, name: str) -> LinearMultiheadAttention:
    """Replace the ``nn.MultiheadAttention`` ``model.<name>`` (a submodule, not ``model`` itself) by its
    :class:`LinearMultiheadAttention` in its parent; returns the new module.

    Raises:
        ValueError: a form :meth:`LinearMultiheadAttention.from_mha` does not reproduce.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    new = LinearMultiheadAttention.from_mha(getattr(parent, attr))
    setattr(parent, attr, new)
    return new
