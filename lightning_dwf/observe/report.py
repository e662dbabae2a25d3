"""Sparsity, compression and factor-balance statistics of a (factorized or collapsed) model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lightning_dwf.core.factorize import factorized_tensors, select_tensors
from lightning_dwf.core.functional import DEFAULT_THRESHOLD, count_nonzero, factor_sq_norm, l2d_quasinorm
from lightning_dwf.core.gating import gated_tensors
from lightning_dwf.core.sharding import full_tensor, global_count, root_mean_square


@dataclass(frozen=True)
class LayerSparsity:
    """Statistics of one factorized (or, for a plain model, prunable) tensor.

    Attributes:
        name: qualified tensor name. shape: its shape. numel: number of weights.
        nonzero: weights with ``|w| >= threshold`` (non-zeros after collapse).
        depth: D (None for a plain tensor).
        l2d: Σ|w|^(2/D) of the collapsed weight (None when D is unknown).
        factor_sq_norm_mean: (1/D)·Σ_d ||ω_d||² (equals ``l2d`` for a plain tensor).
        groups: for a gated tensor (structured DWF) its number of groups, else 0; its ``numel`` and ``nonzero`` then
            count the weights of the gated tensor and of the tensors coupled to it, and ``l2d`` is Σ_g ‖w_g‖^(2/D).
        live_groups: groups whose RMS is at or above the threshold (they survive collapse).
    """

    name: str
    shape: tuple[int, ...]
    numel: int
    nonzero: int
    depth: int | None
    l2d: float | None
    factor_sq_norm_mean: float | None
    groups: int = 0
    live_groups: int = 0

    @property
    def group_sparsity(self) -> float | None:
        """Fraction of the groups that are zero after collapse (None for an unstructured tensor)."""
        return 1.0 - self.live_groups / self.groups if self.groups else None

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are zero after collapse."""
        return 1.0 - self.nonzero / self.numel

    @property
    def compression_ratio(self) -> float:
        """weights / non-zeros (``inf`` for an all-zero tensor)."""
        return self.numel / self.nonzero if self.nonzero else math.inf

    @property
    def misalignment(self) -> float:
        """(1/D)Σ||ω_d||² − Σ|w|^(2/D) ≥ 0; zero iff balanced (0 for a plain tensor)."""
        if self.factor_sq_norm_mean is None or self.l2d is None:
            return 0.0
        return max(self.factor_sq_norm_mean - self.l2d, 0.0)


@dataclass(frozen=True)
class SparsityReport:
    """Per-layer and global statistics; see :func:`sparsity_report`.

    Attributes:
        layers: one entry per factorized tensor.
        threshold: absolute magnitude below which a weight counts as zero.
        lam: λ used for the penalty values (None if not given).
        total_params: every parameter of the model after collapse (factorized tensors count once).
        total_nonzero: non-zeros among them (unfactorized parameters count as they are).
    """

    layers: list[LayerSparsity]
    threshold: float
    lam: float | None
    total_params: int
    total_nonzero: int
    finite: bool = field(default=True)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def nonzero(self) -> int:
        return sum(layer.nonzero for layer in self.layers)

    @property
    def sparsity(self) -> float:
        """Fraction of the factorized weights that are zero after collapse."""
        return 1.0 - self.nonzero / self.numel if self.numel else 0.0

    @property
    def compression_ratio(self) -> float:
        """Factorized weights / their non-zeros (the paper's CR)."""
        return self.numel / self.nonzero if self.nonzero else math.inf

    @property
    def compression_ratio_all(self) -> float:
        """All parameters / all non-zeros (biases and norm layers included)."""
        return self.total_params / self.total_nonzero if self.total_nonzero else math.inf

    @property
    def group_sparsity(self) -> float | None:
        """Fraction of the groups of all gated tensors that are zero after collapse (None without gated tensors)."""
        groups = sum(layer.groups for layer in self.layers)
        return 1.0 - sum(layer.live_groups for layer in self.layers) / groups if groups else None

    @property
    def unit_sparsity(self) -> float:
        """Fraction of the units that are zero after collapse: weights of factorized tensors and groups of gated ones
        (equals :attr:`sparsity` without gated tensors). Target mode steers and cuts by it."""
        if not any(layer.groups for layer in self.layers):
            return self.sparsity
        units = sum(layer.groups or layer.numel for layer in self.layers)
        live = sum(layer.live_groups if layer.groups else layer.nonzero for layer in self.layers)
        return 1.0 - live / units if units else 0.0

    @property
    def dead_layers(self) -> list[str]:
        """Names of the tensors with no weight at or above the threshold: collapsed, their layer's output ignores its
        input."""
        return [layer.name for layer in self.layers if layer.nonzero == 0]

    @property
    def misalignment(self) -> float:
        """Σ over layers of the absolute misalignment M."""
        return sum(layer.misalignment for layer in self.layers)

    @property
    def relative_misalignment(self) -> float:
        """M / ((1/D)Σ||ω_d||²) in [0, 1]: the share of the factor penalty that is imbalance."""
        total = sum(layer.factor_sq_norm_mean or 0.0 for layer in self.layers)
        return self.misalignment / total if total > 0 else 0.0

    @property
    def l2d_penalty(self) -> float | None:
        """λ·Σ|w|^(2/D) over all layers: the collapsed, sparsity-inducing penalty (None without λ)."""
        if self.lam is None or any(layer.l2d is None for layer in self.layers):
            return None
        return self.lam * sum(layer.l2d for layer in self.layers)  # type: ignore[misc]

    @property
    def factor_penalty(self) -> float | None:
        """(λ/D)·Σ||ω_d||²: the smooth penalty that training applies (None without λ)."""
        if self.lam is None or any(layer.factor_sq_norm_mean is None for layer in self.layers):
            return None
        return self.lam * sum(layer.factor_sq_norm_mean for layer in self.layers)  # type: ignore[misc]

    def metrics(self, prefix: str = "dwf/", per_layer: bool = True) -> dict[str, float]:
        """Flat ``{name: value}`` dict for loggers (``dwf/sparsity``, ``dwf/sparsity/<layer>`` …)."""
        out = {
            f"{prefix}sparsity": self.sparsity,
            f"{prefix}compression_ratio": self.compression_ratio,
            f"{prefix}misalignment": self.relative_misalignment,
        }
        if self.l2d_penalty is not None:
            out[f"{prefix}penalty"] = self.l2d_penalty
        if self.factor_penalty is not None:
            out[f"{prefix}factor_penalty"] = self.factor_penalty
        if self.group_sparsity is not None:
            out[f"{prefix}group_sparsity"] = self.group_sparsity
        if per_layer:
            out.update({f"{prefix}sparsity/{layer.name}": layer.sparsity for layer in self.layers})
            out.update({f"{prefix}group_sparsity/{layer.name}": layer.group_sparsity for layer in self.layers
                        if layer.groups})
        return out

    def final_metrics(self) -> dict[str, float]:
        """The collapsed model's numbers for the loggers at fit end (``dwf/final/...``)."""
        final = {f"dwf/final/{k[4:]}": v for k, v in self.metrics(per_layer=False).items()}
        final["dwf/final/compression_ratio_all_params"] = self.compression_ratio_all
        final["dwf/final/threshold"] = self.threshold
        return final

    def table(self, title: str = "DWF sparsity") -> rich.table.Table:  # noqa: F821
        """A ``rich`` table with one row per layer and a total row."""
        from rich.table import Table

        table = Table(title=title)
        for col in ("layer", "shape", "weights", "non-zeros", "sparsity", "CR", "misalignment"):
            table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
        for layer in self.layers:
            table.add_row(
                layer.name, "×".join(map(str, layer.shape)), f"{layer.numel:,}", f"{layer.nonzero:,}",
                f"{layer.sparsity:.2%}", f"{layer.compression_ratio:.1f}", f"{layer.misalignment:.3g}",
            )
        table.add_row(
            "total", "", f"{self.numel:,}", f"{self.nonzero:,}", f"{self.sparsity:.2%}",
            f"{self.compression_ratio:.1f}", f"{self.relative_misalignment:.2%} rel.", end_section=True,
        )
        table.add_row("all parameters", "", f"{self.total_params:,}", f"{self.total_nonzero:,}", "",
                      f"{self.compression_ratio_all:.1f}", "")
        return table


@torch.no_grad()
def sparsity_report(
    module: nn.Module, threshold: float = DEFAULT_THRESHOLD, lam: float | None = None, depth: int | None = None,
    *, counts_only: bool = False,
) -> SparsityReport:
    """Measure how sparse ``module`` would be after :func:`collapse_` at ``threshold``.

    For a factorized model the layers are its factorized tensors (with misalignment and L_{2/D}
    penalty). For a plain model they are the Linear/Conv weights; pass ``depth`` to get their
    L_{2/D} penalty.

    Args:
        module: factorized or plain model.
        threshold: absolute magnitude below which a weight counts as zero.
        lam: λ (mean-loss units) for the penalty values.
        depth: D for the penalty of a plain model (ignored for factorized tensors).
        counts_only: only the zero counts (sparsity, unit sparsity), what target mode's controller reads: no penalty or
            factor norms (``None``) and no finiteness check (``finite`` is True).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Linear(4, 2)
        >>> with torch.no_grad():
        ...     net.weight[0] = 0.0
        >>> report = sparsity_report(net)
        >>> report.sparsity, report.compression_ratio
        (0.5, 2.0)
    """
    layers: list[LayerSparsity] = []
    finite = True
    counted: set[int] = set()
    tensors = factorized_tensors(module)
    for t in tensors:
        factors = t.factors
        counted.update(id(f) for f in factors)
        w = t.product()
        nonzero = count_nonzero(w, threshold)
        if counts_only:
            layers.append(LayerSparsity(t.name, tuple(w.shape), w.numel(), nonzero, t.depth, None, None))
            continue
        finite = finite and _all_finite(w)
        layers.append(LayerSparsity(
            t.name, tuple(w.shape), w.numel(), nonzero,
            t.depth, float(full_tensor(l2d_quasinorm(w, t.depth))),
            float(full_tensor(factor_sq_norm(factors))) / t.depth,
        ))
    for g in gated_tensors(module):
        counted.update(id(f) for f in g.factors)
        rms = g.unit_magnitudes()  # non-finite weights make their group's RMS non-finite
        live = int((rms >= threshold).sum()) if threshold > 0 else int((g.scale() != 0).sum())
        if counts_only:
            layers.append(LayerSparsity(g.name, tuple(g.omega.shape), g.entries * g.groups, live * g.entries,
                                        g.depth, None, None, g.groups, live))
            continue
        finite = finite and bool(torch.isfinite(rms).all())
        norms = (rms.double().pow(2) * g.entries).sqrt()
        layers.append(LayerSparsity(
            g.name, tuple(g.omega.shape), g.entries * g.groups, live * g.entries, g.depth,
            float(norms.pow(2.0 / g.depth).sum()), g.factor_sq_norm() / g.depth, g.groups, live,
        ))
    if not layers:
        for name, mod, pname in select_tensors(module):
            w = getattr(mod, pname)
            counted.add(id(w))
            l2d = float(full_tensor(l2d_quasinorm(w, depth))) if depth else None
            layers.append(LayerSparsity(
                name, tuple(w.shape), w.numel(), count_nonzero(w, threshold),
                depth, l2d, l2d,
            ))
    rest = [p for p in module.parameters() if id(p) not in counted]
    total_params = sum(layer.numel for layer in layers) + sum(p.numel() for p in rest)
    total_nonzero = sum(layer.nonzero for layer in layers) + sum(count_nonzero(p, 0.0) for p in rest)
    return SparsityReport(layers, threshold, lam, total_params, total_nonzero, finite)


@torch.no_grad()
def weight_scales(module: nn.Module) -> tuple[float, float]:
    """``(largest per-tensor RMS, global RMS)`` of the collapsed factorized weights of ``module``.

    The first is the magnitude an unsupported weight shrinks from (the LR floor's ``init_std``); the second sets
    target mode's default control threshold. Over all ranks when the factors are sharded.
    """
    weights = [t.product() for t in factorized_tensors(module)] + [v for g in gated_tensors(module) for v in g.values()]
    scale = max(root_mean_square(w) for w in weights)
    rms = math.sqrt(sum(float(full_tensor(w.pow(2).sum())) for w in weights) / sum(w.numel() for w in weights))
    return scale, rms


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry of ``tensor`` is finite, over all ranks when it is sharded."""
    return not global_count(~torch.isfinite(tensor))
