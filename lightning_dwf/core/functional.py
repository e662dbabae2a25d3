"""Pure tensor math of Deep Weight Factorization (no modules, no state).

Conventions: ``lam`` is λ in the units of a *mean* (per-sample averaged) training loss, the factor
penalty is ``(lam / D) * Σ_d ||ω_d||²`` and its collapsed equivalent is ``lam * Σ_j |w_j|^(2/D)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from lightning_dwf.core.sharding import global_count

#: Float32 machine epsilon: collapsed weights with ``|w| <`` this are set to exact zero.
DEFAULT_THRESHOLD = 1.19e-7


#: Factors of at least this many elements are multiplied by :class:`_HadamardProduct` (one graph node) when autograd
#: records; smaller ones by the plain chain, whose native nodes cost less than one Python node there (forward and
#: backward of D = 3 factors, 2 threads: 32 against 49 µs at 1,000 elements, 131 against 138 µs at 100,000, 416
#: against 371 µs at 235,200). Both give the same values and gradients bit for bit.
ONE_NODE_MIN_NUMEL = 1 << 17


def hadamard_product(factors: Sequence[Tensor]) -> Tensor:
    """Elementwise product ω1 ⊙ … ⊙ ωD (``((ω1·ω2)·ω3)…``; with autograd recording and factors of at least
    :data:`ONE_NODE_MIN_NUMEL` elements, one graph node instead of D − 1: :class:`_HadamardProduct`, the same values
    and gradients bit for bit, but no second derivative through it)."""
    if (len(factors) > 1 and factors[0].numel() >= ONE_NODE_MIN_NUMEL and torch.is_grad_enabled()
            and any(f.requires_grad for f in factors)):
        return _HadamardProduct.apply(*factors)
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


class _HadamardProduct(torch.autograd.Function):
    """``ω1 ⊙ … ⊙ ωD`` as one autograd node: the chain of D − 1 multiplications records D − 1 nodes, whose dispatch
    cost a small model's training step more than the arithmetic (LeNet-300-100, batch 256: 2.6–2.8 ms against 2.4 ms
    per forward and backward). Forward and backward multiply in the order the chain's own backward does, so the results
    are bit-identical to it."""

    @staticmethod
    def forward(ctx: Any, *factors: Tensor) -> Tensor:
        prefixes = [factors[0]]  # prefixes[k] = ω1 ⊙ … ⊙ ω(k+1)
        for f in factors[1:]:
            prefixes.append(prefixes[-1] * f)
        ctx.save_for_backward(*factors, *prefixes[:-1])
        return prefixes[-1]

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        depth = len(saved) // 2 + 1
        factors, prefixes = saved[:depth], saved[depth:]
        grads: list[Tensor | None] = [None] * depth
        for k in range(depth - 1, 0, -1):  # ∂/∂ωk = g ⊙ (ω1 ⊙ … ⊙ ω(k−1)), then g ← g ⊙ ωk
            if ctx.needs_input_grad[k]:
                grads[k] = grad * prefixes[k - 1]
            grad = grad * factors[k]
        grads[0] = grad if ctx.needs_input_grad[0] else None
        return tuple(grads)


def balanced_factors(weight: Tensor, depth: int) -> tuple[Tensor, ...]:
    """Factors with ``|ω_d| = |w|^(1/D)`` whose product is ``weight`` (the AM–GM minimizer).

    The sign goes on the first factor. Exact zeros give all-zero factors, which stay zero in training.
    """
    magnitude = weight.abs().pow(1.0 / depth)
    return (torch.sign(weight) * magnitude,) + tuple(magnitude.clone() for _ in range(depth - 1))


def factor_sq_norm(factors: Sequence[Tensor]) -> Tensor:
    """Σ_d ||ω_d||² (a scalar tensor)."""
    return torch.stack([f.pow(2).sum() for f in factors]).sum()


def factor_penalty(factors: Sequence[Tensor], lam: float) -> Tensor:
    """The smooth DWF penalty ``(lam / D) * Σ_d ||ω_d||²`` of one factorized tensor."""
    return factor_sq_norm(factors) * (lam / len(factors))


def l2d_quasinorm(weight: Tensor, depth: int) -> Tensor:
    """Σ_j |w_j|^(2/D): the collapsed penalty per unit λ (the L1 norm for D = 2)."""
    return weight.abs().pow(2.0 / depth).sum()


def misalignment(factors: Sequence[Tensor]) -> Tensor:
    """``(1/D) Σ_d ||ω_d||² − Σ_j |w_j|^(2/D)`` (≥ 0, zero iff the factorization is balanced).

    The factorized objective equals the collapsed L_{2/D} objective plus ``lam * misalignment``.
    """
    depth = len(factors)
    return factor_sq_norm(factors) / depth - l2d_quasinorm(hadamard_product(factors), depth)


def lam_to_weight_decay(lam: float, depth: int) -> float:
    """SGD ``weight_decay`` on the factors that equals the penalty ``(lam/D) Σ||ω_d||²``: ``2·lam/D``."""
    return 2.0 * lam / depth


def weight_decay_to_lam(weight_decay: float, depth: int) -> float:
    """Inverse of :func:`lam_to_weight_decay`: ``lam = D·weight_decay/2``."""
    return depth * weight_decay / 2.0


def lr_floor(
    lam: float, steps: float, init_std: float, threshold: float = DEFAULT_THRESHOLD, min_log_ratio: float = 0.0
) -> float:
    """Smallest peak SGD learning rate that lets an unsupported weight reach ``threshold`` in ``steps``.

    An unsupported weight shrinks by ``1 − 2·η·lam`` per step, so reaching ``threshold`` from
    ``init_std`` needs ``2·lam·Σ_t η_t ≥ ln(init_std / threshold)``. With cosine decay from ``η0``
    (``Σ_t η_t = η0·steps/2``) this is ``η0 ≥ ln(init_std / threshold) / (lam·steps)``, with the log ratio
    taken at least ``min_log_ratio``. The relation is symmetric in η0 and λ: :func:`lam_floor` is the same
    formula solved for λ. Returns ``inf`` when ``lam``, ``steps`` or ``threshold`` is zero.

    >>> round(lr_floor(lam=1e-3, steps=1000, init_std=0.05, threshold=1e-3), 3)
    3.912
    """
    if lam <= 0 or steps <= 0 or threshold <= 0:
        return math.inf
    return max(math.log(init_std / threshold), min_log_ratio) / (lam * steps)


def lam_floor(
    lr: float, steps: float, init_std: float, threshold: float = DEFAULT_THRESHOLD, min_log_ratio: float = 0.0
) -> float:
    """Smallest λ at which an unsupported weight reaches ``threshold`` in ``steps`` at peak learning rate ``lr``.

    :func:`lr_floor` solved for λ (``lr·λ·steps = ln(init_std / threshold)``): the one place that formula lives.
    """
    return lr_floor(lr, steps, init_std, threshold, min_log_ratio)


def prox_threshold(step: float, lam: float, depth: int) -> float:
    """The magnitude below which the proximal map of ``step·lam·|w|^(2/D)`` is exactly zero (absolute).

    The proximal step ``argmin_x ½(x − z)² + step·lam·|x|^q`` (q = 2/D) maps ``|z| < τ`` to 0, with
    ``τ = (2−q)·(2(1−q))^((q−1)/(2−q))·(step·lam)^(1/(2−q))``: the lasso's soft threshold ``step·lam`` for D = 2,
    ``≈ 1.476·(step·lam)^(3/4)`` for D = 3, ``1.5·(step·lam)^(2/3)`` for D = 4. The decoupled (Adam-type) penalty
    applies it to the collapsed weights after each step in fixed-λ mode, where Adam's normalized step would
    otherwise hold every weight with a consistent gradient off zero (docs, "Optimizers"). 0 for D = 1 (no threshold).

    >>> prox_threshold(0.01, 2.0, depth=2), round(prox_threshold(1e-3, 0.3, depth=3), 5)
    (0.02, 0.00336)
    """
    t = step * lam
    if depth < 2 or t <= 0:
        return 0.0
    q = 2.0 / depth
    if depth == 2:
        return t
    return (2.0 - q) * (2.0 * (1.0 - q)) ** ((q - 1.0) / (2.0 - q)) * t ** (1.0 / (2.0 - q))


#: Bounds of :func:`auto_lr_multiplier`.
AUTO_MULTIPLIER_RANGE = (0.1, 100.0)
#: :func:`auto_lr_multiplier` under Adam-type optimizers, for every tensor (measured on the generalization matrix).
DECOUPLED_AUTO_MULTIPLIER = 5.0
#: :func:`auto_gated_lr_multiplier` under Adam-type optimizers, for every gated tensor (measured on the structured
#: speed benchmark).
GATED_DECOUPLED_AUTO_MULTIPLIER = 10.0


def auto_lr_multiplier(weight_rms: float, depth: int, kind: str) -> float:
    """The factor LR multiplier of ``FactorLRConfig(multiplier="auto")`` for a tensor whose weights have RMS
    ``weight_rms``.

    ``kind="gradient"`` (SGD): with balanced factors (``|ω_d| = |w|^(1/D)``) a gradient step on the factors moves ``w``
    by ``D·|w|^(2−2/D)`` times the dense step, about 18× less than dense at ``|w| = 0.05``, D = 3. The multiplier is the
    inverse at ``weight_rms``, clipped to :data:`AUTO_MULTIPLIER_RANGE`: a typical weight trains at the optimizer's LR,
    smaller ones slower (the rich-get-richer geometry of DWF) and larger ones faster, up to the step cap
    (``FactorLRConfig.step_cap``, :data:`~lightning_dwf.config.DEFAULT_STEP_CAP` times the dense step), which keeps a
    weight that grows far past its init range from running away. (Before the cap, the inverse was taken at
    ``2·weight_rms``, so that the largest weights of the init range set the stability limit: 2^(2−2/D) times slower.)

    ``kind="decoupled"`` (Adam-type): :data:`DECOUPLED_AUTO_MULTIPLIER` for every tensor, whatever its RMS. Adam's
    normalized step moves every factor by about the LR, so a weight ``w`` moves by about ``D·|w|^(1−1/D)`` times the LR
    where dense training moves it by the LR (0.4× at ``|w| = 0.05`` for D = 2, 3 and 4 alike, 0.2× at
    ``|w| = 0.017``): the multiplier gives the small weights, among which the cut is decided, about dense training's
    step. One value for every tensor, not one per layer, keeps the global cut from favouring the layers that train
    faster. Measured on the matrix (``python -m benchmarks.factor_lr --opt adamw``): 2.5 gained 1–4 points over 1 in
    all 8 cells probed, and 5 a further 0.4–2.2 in 7 of 9 (D = 3; at D = 2 and 4 it beat 2.5 on the one cell probed).

    >>> round(auto_lr_multiplier(0.05, 3, "gradient"), 2), auto_lr_multiplier(0.05, 3, "decoupled")
    (18.1, 5.0)
    """
    if kind != "gradient":
        return DECOUPLED_AUTO_MULTIPLIER
    return _clipped_inverse(depth * _step_gain(weight_rms, depth))


def auto_gated_lr_multiplier(group_norm: float, depth: int, kind: str) -> float:
    """The factor LR multiplier of ``FactorLRConfig(multiplier="auto")`` for a gated tensor (structured DWF);
    ``group_norm`` is the root mean square of its groups' norms ``‖w_g‖₂``.

    ``kind="gradient"`` (SGD): at balance (``|γ_{g,d}| = ‖ω_g‖ = n^(1/D)``) a gradient step moves a weight within its
    group (through ω alone) by ``n^(2−2/D)`` times the dense step, and the group's norm (through ω and the D − 1 gates)
    by ``D·n^(2−2/D)`` times. The multiplier is ``1/n^(2−2/D)``, clipped to :data:`AUTO_MULTIPLIER_RANGE`: the
    weights train at the optimizer's LR within their group, and the groups' norms separate D times faster. Measured
    on the structured speed benchmark (SGD, 3 epochs, 50 / 25 / 10 % of the MACs, means of 3 seeds): against the
    group-norm rule ``1/(D·n^(2−2/D))`` used before, +0.25 to +0.87 points on every cell of LeNet-300-100, the BN CNN,
    the ViT and the width-2048 MLP.

    ``kind="decoupled"`` (Adam-type): :data:`GATED_DECOUPLED_AUTO_MULTIPLIER` for every gated tensor. Adam's normalized
    step moves a gate by about the LR whatever its size, so at the optimizer's LR (1e-3) a gate of size n^(1/D) ≈ 0.8
    can travel only a fraction of its size in a run, and the groups barely separate before the cut. Measured (AdamW,
    seed 0, 25 % of the MACs, LeNet-300-100 / BN CNN / ViT): ×1 84.77 / 87.67 / 81.69 %, ×5 86.99 / 88.88 / 82.63 %,
    ×10 87.38 / 89.11 / 83.10 %, ×20 87.66 / 88.98 / 82.74 %, ×40 87.12 / 89.20 / 82.55 %: 10 is the start of the
    plateau.

    >>> round(auto_gated_lr_multiplier(0.577, 3, "gradient"), 2), auto_gated_lr_multiplier(0.577, 3, "decoupled")
    (2.08, 10.0)
    """
    if kind != "gradient":
        return GATED_DECOUPLED_AUTO_MULTIPLIER
    return _clipped_inverse(_step_gain(group_norm, depth))


def factor_step_gain(factors: Sequence[Tensor], workspace: Sequence[Tensor] | None = None) -> Tensor:
    """``Σ_d Π_{j≠d} ω_j²`` elementwise: how many times as far as a dense weight a gradient step of the same LR on the
    factors moves their product ``w`` (to first order; ``D·|w|^(2−2/D)`` with balanced factors). It grows without
    bound as ``|w|`` grows, which is why :class:`~lightning_dwf.FactorPenalty` caps it (``FactorLRConfig.step_cap``).

    Args:
        factors: the D factors (same shape; D >= 2).
        workspace: D tensors of the factors' shape and dtype to compute in (the result is one of them), so that a
            caller at every step allocates nothing; by default fresh ones.

    >>> factor_step_gain([torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([1.0])]).item()
    49.0
    """
    depth = len(factors)
    if workspace is None:
        workspace = [torch.empty_like(factors[0]) for _ in range(depth)]
    # the elementary symmetric polynomials of the squares ω_j², degree k in sums[k] (k = 1 … D − 1), built up one
    # factor at a time, top down so that each reads the degree below before it grows; degree 1 starts as the first
    # square, and each later square lives in the last buffer until the next one replaces it
    sums = [workspace[0], *workspace[:depth - 1]]  # sums[0] is never read
    square = workspace[depth - 1]
    torch.mul(factors[0], factors[0], out=sums[1])
    for i in range(1, depth):
        x = torch.mul(factors[i], factors[i], out=square)
        for k in range(min(i + 1, depth - 1), 0, -1):
            if i == depth - 1 and k < depth - 1:
                break  # the last factor: only the top degree is needed
            if k == 1:
                sums[1].add_(x)
            elif k == i + 1:  # the first product of this degree
                torch.mul(sums[k - 1], x, out=sums[k])
            else:
                sums[k].addcmul_(sums[k - 1], x)
    return sums[depth - 1]


def _step_gain(magnitude: float, depth: int) -> float:
    """``magnitude^(2−2/D)``: how much faster than dense one balanced factor's step moves the product."""
    return magnitude ** (2.0 - 2.0 / depth) if magnitude > 0 else 0.0


def _clipped_inverse(gain: float) -> float:
    """``1 / gain`` clipped to :data:`AUTO_MULTIPLIER_RANGE` (its upper end for a zero gain)."""
    low, high = AUTO_MULTIPLIER_RANGE
    return high if gain <= 0 else min(high, max(low, 1.0 / gain))


#: Bits per stored value of the per-channel grid (None: float weights, no grid).
SUPPORTED_BITS = (None, 8, 4)


def channel_scales(weight: Tensor, bits: int) -> Tensor:
    """Per-output-channel step ``max|w_r| / (2**(bits-1) - 1)`` (float32, one per row of dim 0; 0 for a zero row).

    >>> channel_scales(torch.tensor([[0.7, -0.1], [0.0, 0.0]]), bits=4)
    tensor([0.1000, 0.0000])
    """
    rows = weight.detach().reshape(weight.shape[0], -1).double()
    return (rows.abs().amax(dim=1) / (2 ** (bits - 1) - 1)).float()


def grid_codes(weight: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The integer codes ``round(w / scale)`` (float64, in ``[-(2**(bits-1)-1), 2**(bits-1)-1]``) of ``weight`` on
    its per-channel grid, and the float32 scales of :func:`channel_scales`; a zero row keeps codes 0."""
    scales = channel_scales(weight, bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).double()
    qmax = 2 ** (bits - 1) - 1
    shape = (-1, *([1] * (weight.dim() - 1)))
    return torch.round(weight.detach().double() / safe.view(shape)).clamp_(-qmax, qmax), scales


def quantize_to_grid(weight: Tensor, bits: int) -> Tensor:
    """``weight`` rounded to its per-channel grid (``round(w / scale) · scale``), without a gradient."""
    codes, scales = grid_codes(weight, bits)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales)).double()
    return (codes * safe.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)


def fake_quantize(weight: Tensor, bits: int) -> Tensor:
    """The straight-through fake quantizer: forward ``quantize_to_grid(weight)``, gradient of the identity.

    >>> w = torch.tensor([[0.7, -0.12, 0.0]], requires_grad=True)
    >>> fake_quantize(w, bits=4)
    tensor([[ 0.7000, -0.1000,  0.0000]], grad_fn=<AddBackward0>)
    """
    return weight + (quantize_to_grid(weight, bits) - weight).detach()


def threshold_(weight: Tensor, threshold: float) -> Tensor:
    """Set entries with ``|w| < threshold`` to exact zero, in place; returns ``weight``."""
    if threshold > 0:
        weight.masked_fill_(weight.abs() < threshold, 0.0)
    return weight


def count_nonzero(weight: Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Entries that survive :func:`threshold_` (``|w| >= threshold`` and ``w != 0``), over all ranks when
    ``weight`` is sharded."""
    return global_count(weight.abs() >= threshold if threshold > 0 else weight != 0)
