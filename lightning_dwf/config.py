"""Settings of each concern as small validated config objects, shared by the plain functions and the callback.

Each config is a frozen dataclass with defaults that checks itself at construction (``__post_init__``), so a bad
value fails where it is written, with a message that names the field and the fix (the pattern of torchao's
``quantize_`` configs). ``DWFCallback`` takes them as ``factorize=``, ``schedule=``, ``factor_lr=`` and ``collapse=``;
LightningCLI/YAML fills them as nested mappings.

>>> from lightning_dwf import FactorizeConfig
>>> FactorizeConfig(exclude=["classifier"]).exclude
('classifier',)
>>> FactorizeConfig(init="pretrained")
Traceback (most recent call last):
...
ValueError: `init` must be one of ('dwf', 'balanced'), got 'pretrained'.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from torch import nn

from lightning_dwf._validation import (
    check_bits,
    check_choice,
    check_fraction,
    check_int,
    check_nonnegative,
    check_patterns,
    check_positive,
    check_target,
    set_field,
)
from lightning_dwf.core.functional import DEFAULT_THRESHOLD
from lightning_dwf.core.groups import STRUCTURES
from lightning_dwf.core.init import DEFAULT_EPS_RATIO, InitStd

#: Every tensor keeps at least this fraction of its uniform share ``(1 − target)·n`` of weights (and at least one) at a
#: support cut, so that a global magnitude cut never empties a layer whose weights are small in scale
#: (``ScheduleConfig.min_layer_share``, :func:`~lightning_dwf.cut_to_sparsity_`).
DEFAULT_MIN_LAYER_SHARE = 0.1

#: ``FixedLamConfig(recovery=None)`` in a run with a step budget: λ ramps over the first half of the run, the proximal
#: step and its per-layer guard make the zeros, and the second half trains the fixed pattern without penalty. Against a
#: constant λ, measured in docs/guides/optimizers.md: under SGD the constant λ jumped from 8× to 590× compression
#: between neighbouring λ, guarded no layer, and was 1.7–2.6 points less accurate at equal zeros; under AdamW the ramp
#: was 0.9–2.4 points more accurate at equal compression, and in structured DWF more accurate at equal MACs under both.
DEFAULT_LAM_RECOVERY = 0.5

#: Under SGD-type optimizers no factorized weight moves more than this many times as far per step as a dense weight at
#: the optimizer's LR (``FactorLRConfig.step_cap``; measured in docs/findings/why.md).
DEFAULT_STEP_CAP = 3.0

#: Under SGD-type optimizers, the step cap while the sparsity pattern is being made
#: (``FactorLRConfig.pattern_step_cap``): one dense step, :data:`DEFAULT_STEP_CAP` from then on. Against the cap of 3
#: throughout, over the matrix's 57 SGD cells from scratch (docs/findings/why.md): 37 gains, 19 losses, mean +0.51
#: points; it closed the cells where the LR sits at the edge of what dense training survives (LeNet-5 on 2,000 images
#: at 99.5 %: −5.56 → +0.38 points to ModelPruning) and cost the MNIST subset, which wants fast factors, 0.3–0.7 points
#: at 98–99.5 %.
DEFAULT_PATTERN_STEP_CAP = 1.0

#: Targets from which the default recovery phase is shorter (a longer ramp for the penalty).
HIGH_TARGET = 0.995

#: Layer classes, or ``torch.nn`` class names such as ``"Linear"``.
LayerType = type[nn.Module] | str
#: ``filter_fn(module, qualified_name) -> bool``: whether a layer is factorized (after ``layer_types``/``include``).
FilterFn = Callable[[nn.Module, str], bool]


#: Layers factorized by default: the weights of Linear and Conv1d/2d/3d. Biases, norm layers and
#: embeddings stay plain unless selected explicitly.
DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def resolve_layer_types(layer_types: Sequence[LayerType] | LayerType | None) -> tuple[type[nn.Module], ...]:
    """Layer classes from classes or ``torch.nn`` class names (``"Linear"``, ``"torch.nn.Conv2d"``)."""
    if layer_types is None:
        return DEFAULT_LAYER_TYPES
    if isinstance(layer_types, (str, type)):
        layer_types = [layer_types]
    resolved = []
    for t in layer_types:
        if isinstance(t, str):
            cls = getattr(nn, t.rsplit(".", 1)[-1], None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise ValueError(f"`layer_types` entry {t!r} is not a torch.nn layer class name; use e.g. 'Linear' or "
                                 "'Conv2d', or pass the class.")
            t = cls
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"`layer_types` entries must be nn.Module subclasses or their names, got {t!r}.")
        resolved.append(t)
    if not resolved:
        raise ValueError("`layer_types` is empty: nothing could be factorized. Leave it unset for Linear and Conv "
                         "layers.")
    return tuple(resolved)


@dataclass(frozen=True)
class SelectionConfig:
    """Which tensors of which layers a transform applies to; the selection fields of :class:`FactorizeConfig` (DWF)
    and of :class:`~lightning_dwf.DecomposeConfig` (the sparse quantized decomposition), read by
    :func:`~lightning_dwf.core.factorize.select_tensors`.

    Args:
        layer_types: layer classes or ``torch.nn`` names whose tensors are selected (default Linear,
            Conv1d/2d/3d: :data:`lightning_dwf.DEFAULT_LAYER_TYPES`).
        include: glob patterns of qualified module names to select (default: every layer of ``layer_types``).
        exclude: glob patterns of module names to leave alone (e.g. ``["classifier"]``).
        param_names: tensors to select on each selected layer (``("weight", "bias")`` adds biases).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, a last say on each selected layer (torchao-style).
    """

    layer_types: Sequence[LayerType] | None = None
    include: Sequence[str] = ()
    exclude: Sequence[str] = ()
    param_names: Sequence[str] = ("weight",)
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        if self.layer_types is not None:
            set_field(self, "layer_types", resolve_layer_types(self.layer_types))
        set_field(self, "include", check_patterns("include", self.include))
        set_field(self, "exclude", check_patterns("exclude", self.exclude))
        set_field(self, "param_names", check_patterns("param_names", self.param_names))
        if not self.param_names:
            raise ValueError("`param_names` is empty: name the tensors to factorize, e.g. ('weight',).")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"`filter_fn` must be a callable (module, qualified_name) -> bool, got {self.filter_fn!r}.")


@dataclass(frozen=True)
class FactorizeConfig(SelectionConfig):
    """What to factorize (the fields of :class:`SelectionConfig`) and how to initialize the factors.

    Args:
        layer_types: layer classes or ``torch.nn`` names whose tensors are factorized (default Linear,
            Conv1d/2d/3d: :data:`lightning_dwf.DEFAULT_LAYER_TYPES`).
        include: glob patterns of qualified module names to factorize (default: every layer of ``layer_types``).
        exclude: glob patterns of module names to keep plain and dense (e.g. ``["classifier"]``).
        param_names: tensors to factorize on each selected layer (``("weight", "bias")`` adds biases).
        filter_fn: ``filter_fn(module, qualified_name) -> bool``, a last say on each selected layer (torchao-style).
        init: ``"dwf"`` (truncated variance-matched init, for training from scratch) or ``"balanced"`` (exact
            factorization ``|ω_d| = |w|^(1/D)`` of the current weights, to sparsify a pretrained model).
        init_std: σ_w of the DWF init: ``"kaiming"`` (sqrt(2/fan_in)), ``"current"`` or a float > 0.
        eps_ratio: lower bound of the initial ``|w|`` relative to σ_w, in (0, 2).
        structure: ``"elements"`` (DWF: every weight its own factors), or structured DWF (D-Gating: one gate per group
            and depth) by ``"outputs"`` (neurons, filters; a Conv followed by a BatchNorm gates the BatchNorm's
            channels), ``"inputs"`` (input features) or ``"heads"`` (attention heads); or a mapping from module-name
            glob to structure, first match wins and unmatched layers are ``"elements"`` (one model can mix both).
            Gated tensors keep their current values (balanced gating); ``init`` applies to ``"elements"`` layers.
        num_heads: the head count of Linear layers gated by ``"heads"`` (``nn.MultiheadAttention`` has its own).
    """

    init: Literal["dwf", "balanced"] = "dwf"
    init_std: InitStd = "kaiming"
    eps_ratio: float = DEFAULT_EPS_RATIO
    structure: str | Mapping[str, str] = "elements"
    num_heads: int | None = None

    def structure_of(self, module_name: str) -> str:
        """The structure chosen for the layer ``module_name``."""
        if isinstance(self.structure, str):
            return self.structure
        for pattern, kind in self.structure.items():
            if fnmatch.fnmatchcase(module_name, pattern):
                return kind
        return "elements"

    @property
    def structured(self) -> bool:
        """Whether any layer is gated (structured DWF)."""
        kinds = [self.structure] if isinstance(self.structure, str) else list(self.structure.values())
        return any(k != "elements" for k in kinds)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("init", self.init, ("dwf", "balanced"))
        std = self.init_std
        if not (std in ("kaiming", "current") or (not isinstance(std, (bool, str)) and isinstance(std, (int, float))
                                                 and std > 0)):
            raise ValueError(f"`init_std` must be 'kaiming', 'current' or a float > 0, got {std!r}.")
        eps = check_positive("eps_ratio", self.eps_ratio)
        if not eps < 2:
            raise ValueError(f"`eps_ratio` must lie in (0, 2) (|w| is drawn from (eps_ratio·σ_w, 2·σ_w)), got {eps}.")
        set_field(self, "eps_ratio", eps)
        kinds = [self.structure] if isinstance(self.structure, str) else None
        if kinds is None:
            if not isinstance(self.structure, Mapping):
                raise TypeError(f"`structure` must be a string or a mapping from module-name glob to structure, got "
                                f"{self.structure!r}.")
            set_field(self, "structure", dict(self.structure))
            kinds = list(self.structure.values())
        for kind in kinds:
            check_choice("structure", kind, STRUCTURES)
        if self.num_heads is not None:
            set_field(self, "num_heads", check_int("num_heads", self.num_heads, 1))


@dataclass(frozen=True)
class ScheduleConfig:
    """How target mode (``target_sparsity=...``) schedules λ: warm-up, ramp, and the recovery phase.

    Args:
        recovery: the fraction of the run, at its end, in which the sparsity pattern is fixed at exactly the target
            and λ = 0, in [0, 0.8] (default :func:`default_recovery` of the target).
        control_threshold: absolute magnitude below which a weight counts as pruned for the λ controller
            (default :func:`~lightning_dwf.training.controller.default_control_threshold` of the weights' RMS and the
            run's length).
        warmup: fraction of the run before the ramp starts (λ stays at its start value).
        gain: step size of the integral controller on log λ (0: λ never leaves its start value).
        max_step: bound on ``|Δ ln λ|`` per controller update (raising; lowering may be 4× faster).
        gradual: cut the support gradually during the ramp (every controller update, the smallest weights down to the
            cubic schedule's sparsity become exact zeros), so that the target is reached whatever the penalty managed;
            ``False``: one cut when the recovery phase starts (lightning-dwf 0.1).
        lead: with ``gradual``, how far ahead of the cut (fraction of the run) the λ controller aims. 0 (default): it
            aims at the cut's own schedule, which the cut always meets, so λ never rises above its start value (a
            tenth of the LR-floor λ) and the cut sets the sparsity; that measured best (LeNet-300-100, 98 %, SGD:
            88.75 % against 87.23 % with lead 0.1; docs, "Benchmarks"). A lead makes the penalty shrink weights
            before the cut removes them, at the cost of shrinking the survivors too.
        min_layer_share: every factorized tensor keeps at least this fraction of its uniform share ``(1 − target)·n``
            of weights (and at least one) at every cut, so no layer is emptied; 0 allows a pure global cut, which can
            empty a layer.
    """

    recovery: float | None = None
    control_threshold: float | None = None
    warmup: float = 0.1
    gain: float = 0.2
    max_step: float = 0.05
    gradual: bool = True
    lead: float = 0.0
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE

    def __post_init__(self) -> None:
        if self.recovery is not None:
            set_field(self, "recovery", check_fraction(
                "recovery", self.recovery, 0.8, True, "the fraction of the run, at its end, trained with the sparsity "
                "pattern fixed and λ = 0 (default: 0.5, or 0.4 for targets >= 0.995; 0 fixes the pattern only at fit "
                "end)",
            ))
        if self.control_threshold is not None:
            set_field(self, "control_threshold", check_positive("control_threshold", self.control_threshold))
        set_field(self, "warmup", check_fraction("warmup", self.warmup, 0.5, False,
                                            "the fraction of the run before λ starts to follow the ramp (e.g. 0.1)"))
        set_field(self, "gain", check_nonnegative("gain", self.gain, " E.g. 0.2, the default."))
        set_field(self, "max_step", check_positive("max_step", self.max_step, " E.g. 0.05, the default."))
        if not isinstance(self.gradual, bool):
            raise ValueError(f"`gradual` must be True (cut the support along the ramp) or False (one cut at the "
                             f"recovery point), got {self.gradual!r}.")
        set_field(self, "lead", check_fraction("lead", self.lead, 0.5, False,
                                          "the fraction of the run the λ controller aims ahead of the cut (e.g. 0.1)"))
        set_field(self, "min_layer_share", check_fraction(
            "min_layer_share", self.min_layer_share, 1.0, True,
            "the fraction of a tensor's uniform share of surviving weights it always keeps (e.g. 0.1; 0 allows "
            "emptying a layer)",
        ))

    def recovery_for(self, target: float) -> float:
        """``recovery``, or its default for ``target`` (fraction of zero weights)."""
        return default_recovery(target) if self.recovery is None else self.recovery


@dataclass(frozen=True)
class FactorLRConfig:
    """The factors' learning rate relative to the optimizer's, and how it is checked.

    Args:
        multiplier: scales the factors' updates, i.e. their learning rate (the other parameters keep theirs).
            ``"auto"`` (default): per factorized tensor, :func:`lightning_dwf.core.functional.auto_lr_multiplier` of its
            weights' RMS at the start of ``fit`` and of the optimizer family, so that a typical weight of every layer
            moves as fast as it would in dense training (DWF's factors otherwise train its weights far more slowly:
            about 18× at RMS 0.05, D = 3, under SGD); under Adam-type optimizers 5 for every tensor. A gated
            (structured) tensor gets :func:`lightning_dwf.core.functional.auto_gated_lr_multiplier` of its groups'
            norm under SGD (its weights move as fast as dense ones within their group), 10 under Adam-type optimizers.
            A number: the same multiplier for every factor.
        warmup: fraction of the planned run over which the multipliers ramp linearly from 1 (0: no ramp); target
            mode repeats the ramp from the recovery point.
        check: at train start, compare the factor LR with the floor needed to reach exact zeros in the planned steps:
            ``"warn"``, ``"error"`` or ``"off"``. An LR at which the penalty alone diverges is always an error.
        rollbacks: how many times a run whose weights went non-finite is rolled back to its last finite state (kept
            every metric-logging step) with the factors' step halved, before it stops with an error (0: stop at once).
        step_cap: under SGD-type optimizers, no weight of an unstructured factorized tensor moves more than this many
            times as far as a dense weight would at the optimizer's LR (per weight, per step; ``None``: no cap). A
            step on the factors moves their product ``D·|w|^(2−2/D)`` times as far as a dense step, so without the cap a
            weight that grows far past the range its multiplier was set for runs away
            (:meth:`~lightning_dwf.FactorPenalty.cap_steps`). Adam-type steps are normalized and gated (structured)
            tensors have their own rule; neither is capped.
        pattern_step_cap: the step cap while the sparsity pattern is being made (target mode before its recovery
            point, a fixed λ before its release); ``step_cap`` from then on. The default 1: no weight moves farther
            than a dense weight until the pattern is fixed, which closed the SGD cells where the optimizer's LR sits at
            the edge of what dense training survives (docs/findings/why.md). ``None``: ``step_cap`` throughout (the
            default before 2026-12-06); ``step_cap=None, pattern_step_cap=None``: no cap at all.
        fixed_pattern: how the surviving weights of unstructured tensors train once the sparsity pattern is fixed
            (target mode's recovery phase, a ramped fixed λ after its release, the quantization-aware finish).
            ``"factors"`` (default): the D factors go on training, with their multipliers and ``step_cap``.
            ``"dense"``: each tensor's weight is put into its first factor (``ω1 = w``, ``ω2 … ωD`` its 0/1 mask, which
            no longer train; ``w`` is unchanged, bit for bit) and ``ω1``'s optimizer state starts afresh, so the
            survivors fine-tune exactly as dense weights under their mask at the optimizer's LR, as a pruner's
            fine-tune does; no multiplier, warm-up or step cap applies to them from then on, and the optimizer steps
            one tensor instead of D. The factor-balance metrics then report the concentration as imbalance. Gated
            (structured) tensors keep training their factors. Measured (docs/findings/why.md): it gained 0.2–0.4
            points on the AdamW small-data cells and the 3-epoch BN CNN cell under SGD, and lost up to 0.8 on
            full-data AdamW runs and tenths both ways under SGD, so it is not the default.
    """

    multiplier: float | Literal["auto"] = "auto"
    warmup: float = 0.1
    check: Literal["warn", "error", "off"] = "warn"
    rollbacks: int = 3
    step_cap: float | None = DEFAULT_STEP_CAP
    pattern_step_cap: float | None = DEFAULT_PATTERN_STEP_CAP
    fixed_pattern: Literal["factors", "dense"] = "factors"

    def __post_init__(self) -> None:
        if self.multiplier != "auto":
            set_field(self, "multiplier", check_positive(
                "multiplier", self.multiplier, " E.g. FactorLRConfig(multiplier=10), or 'auto' (the default)."
            ))
        set_field(self, "warmup", check_fraction(
            "warmup", self.warmup, 1.0, False,
            "the fraction of the run over which the factor LR multiplier ramps up from 1 (e.g. 0.1)",
        ))
        check_choice("check", self.check, ("warn", "error", "off"))
        check_choice("fixed_pattern", self.fixed_pattern, ("factors", "dense"))
        if isinstance(self.rollbacks, bool) or not isinstance(self.rollbacks, int) or self.rollbacks < 0:
            raise ValueError(f"`rollbacks` must be an int >= 0 (0: stop at the first non-finite step), got "
                             f"{self.rollbacks!r}. E.g. FactorLRConfig(rollbacks=3), the default.")
        if self.step_cap is not None:
            set_field(self, "step_cap", check_positive(
                "step_cap", self.step_cap,
                f" E.g. FactorLRConfig(step_cap={DEFAULT_STEP_CAP:g}) (the default), or None for no cap once the "
                "pattern is fixed (with pattern_step_cap=None too: no cap at all)."
            ))
        if self.pattern_step_cap is not None:
            set_field(self, "pattern_step_cap", check_positive(
                "pattern_step_cap", self.pattern_step_cap,
                f" E.g. FactorLRConfig(pattern_step_cap={DEFAULT_PATTERN_STEP_CAP:g}) (the default: one dense step "
                "until the pattern is fixed), or None for step_cap throughout."
            ))

    def step_cap_for(self, pattern_fixed: bool) -> float | None:
        """The step cap of the run's phase: :attr:`pattern_step_cap` while the pattern is being made (unless ``None``),
        else :attr:`step_cap`."""
        return self.step_cap if pattern_fixed or self.pattern_step_cap is None else self.pattern_step_cap


@dataclass(frozen=True)
class CollapseConfig:
    """Collapsing the factors at the end of ``fit``, and the collapsed checkpoint.

    Args:
        threshold: absolute magnitude below which collapsed weights become exact zeros (default 1.19e-7, float32
            epsilon).
        on_fit_end: collapse the model in place when ``fit`` ends.
        save: write the collapsed checkpoint (only when collapsing).
        path: where to write it (default ``<ModelCheckpoint dirpath or log dir>/dwf-collapsed.ckpt``).
        export: also write the collapsed model as a compressed file beside it (``dwf-collapsed.safetensors``,
            :func:`lightning_dwf.save_compressed` at the bits of the callback's :class:`QuantizeConfig`; lossless
            without one).
        quantize_fraction: deprecated, moved to ``QuantizeConfig(fraction=...)`` (still honoured for one release, with
            a ``FutureWarning``).
    """

    threshold: float = DEFAULT_THRESHOLD
    on_fit_end: bool = True
    save: bool = True
    path: str | None = None
    export: bool = False
    quantize_fraction: float | None = None

    def __post_init__(self) -> None:
        set_field(self, "threshold", check_nonnegative("threshold", self.threshold,
                                                  " Use e.g. 1.19e-7 (float32 epsilon), the default."))
        if self.path is not None:
            set_field(self, "path", str(self.path))
        if self.quantize_fraction is not None:
            warnings.warn("CollapseConfig(quantize_fraction=...) moved to QuantizeConfig(fraction=...): pass "
                          "DWFCallback(quantize=QuantizeConfig(bits=..., fraction=...)).", FutureWarning, stacklevel=3)
            set_field(self, "quantize_fraction", check_quantize_fraction(self.quantize_fraction))


@dataclass(frozen=True)
class QuantizeConfig:
    """The quantization-aware finish: the last ``fraction`` of the run trains every factorized weight through a fake
    quantizer on the per-channel grid of :func:`lightning_dwf.save_compressed`, with the sparsity pattern fixed and
    λ = 0, so that the collapsed weights lie on that grid (and export to it without loss).

    Args:
        bits: 8 or 4 bits per stored value.
        fraction: the fraction of the planned run, at its end, trained quantization-aware, in (0, 1).

    >>> QuantizeConfig(bits=4)
    QuantizeConfig(bits=4, fraction=0.2)
    """

    bits: int = 8
    fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.bits is None:
            raise ValueError("`bits` must be 8 or 4; for float weights leave the callback's `quantize` unset.")
        check_bits(self.bits, "bits")
        set_field(self, "fraction", check_quantize_fraction(self.fraction))


def check_quantize_fraction(value: object) -> float:
    """``value`` as the fraction of the run trained quantization-aware, in (0, 1), else raise."""
    fraction = check_fraction("quantize_fraction", value, 1.0, False,
                              "the fraction of the run, at its end, trained quantization-aware (e.g. 0.2)")
    if fraction == 0:
        raise ValueError("`quantize_fraction` must be > 0: the quantization-aware finish needs some steps.")
    return fraction


def default_recovery(target: float) -> float:
    """The recovery fraction that measured best (docs, "Benchmarks"): 0.5 below :data:`HIGH_TARGET`, 0.4 from it on,
    where the penalty needs the longer ramp.

    >>> default_recovery(0.98), default_recovery(0.995)
    (0.5, 0.4)
    """
    return 0.4 if target >= HIGH_TARGET else 0.5


def resolve_target(target_sparsity: float | None, target_compression: float | None) -> float | None:
    """The target as a sparsity (fraction of zero weights) from either dial, or None."""
    if target_compression is not None:
        compression = check_positive("target_compression", target_compression)
        if compression <= 1:
            raise ValueError(f"`target_compression` (weights / non-zeros) must be > 1, got {target_compression}.")
        return 1.0 - 1.0 / compression
    return None if target_sparsity is None else check_target("target_sparsity", target_sparsity)
