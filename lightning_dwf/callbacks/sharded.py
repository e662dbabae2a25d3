"""DWF under Lightning's ``ModelParallelStrategy`` (FSDP2's ``fully_shard``, where the user shards in
``configure_model``): adopting the factors, and the fit-end outputs gathered into one plain state dict.

The factors are created before sharding, so FSDP2 shards them like any parameter (each factor on dim 0, so the shards
of the D factors of one weight line up element by element). Either the callback factorizes at ``setup`` (layers built
in ``__init__``; the user's ``configure_model`` then shards the factorized module), or the user calls
:func:`~lightning_dwf.factorize_` inside ``configure_model`` before ``fully_shard`` (layers built there); the callback
adopts the factorized tensors at fit start. During the fit the training math runs shard by shard
(:mod:`lightning_dwf.core.sharding`). At fit end the model stays sharded and factorized, with exact zeros below the
collapse threshold, and the collapsed checkpoint and the compressed export are written from the gathered, collapsed,
plain state dict on rank zero.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_dwf.config import DEFAULT_LAYER_TYPES, FactorizeConfig
from lightning_dwf.core.collapse import _FACTOR_KEY
from lightning_dwf.core.factorize import factorize_, factorized_tensors
from lightning_dwf.core.functional import fake_quantize, threshold_
from lightning_dwf.core.sharding import SHARD_FIRST_FIX, full_tensor, sharded_parameter_names
from lightning_dwf.export import CompressionReport
from lightning_dwf.export.io import save_state
from lightning_dwf.training.support import fix_support_

__all__ = ["adopt_factorized", "export_collapsed_sharded", "factorize_before_sharding", "finish_sharded",
           "full_collapsed_state_dict", "is_model_parallel", "save_collapsed_sharded"]


def is_model_parallel(trainer: pl.Trainer) -> bool:
    """Whether ``trainer`` runs Lightning's ``ModelParallelStrategy`` (FSDP2 and tensor parallelism)."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def adopt_factorized(module: nn.Module, depth: int) -> list[str]:
    """The factorized tensors of a module sharded in ``configure_model`` (checked against ``depth``).

    Returns:
        Their qualified names.

    Raises:
        MisconfigurationException: nothing is factorized (with the fix: factorize before ``fully_shard``), or a
            tensor has another depth than the callback's.
    """
    tensors = factorized_tensors(module)
    if not tensors:
        sharded = sharded_parameter_names(module)
        what = (f"the model is sharded ({len(sharded)} DTensor parameters, e.g. {sharded[0]!r}) but nothing is "
                "factorized" if sharded else "nothing is factorized")
        raise MisconfigurationException(
            f"DWFCallback under ModelParallelStrategy: {what}. The callback factorizes the layers that exist at "
            f"`setup` (built in `__init__`); layers built in `configure_model` must be factorized there. "
            f"{SHARD_FIRST_FIX}"
        )
    other = sorted({(t.name, t.depth) for t in tensors if t.depth != depth})
    if other:
        raise MisconfigurationException(
            f"DWFCallback(depth={depth}) found tensors factorized with another depth in `configure_model`: "
            f"{other[:5]}. Pass the callback's depth to `factorize_` there (or DWFCallback(depth=...) the same)."
        )
    return [t.name for t in tensors]


def full_collapsed_state_dict(module: nn.Module, threshold: float, rank: int) -> dict[str, torch.Tensor]:
    """Gather ``module``'s state dict with its factors collapsed at ``threshold`` (absolute), to rank zero's CPU.

    A collective: call it on every rank. One tensor at a time, each factorized weight is multiplied out on the shards
    and gathered as one weight (never its D factors); rank zero keeps it on the CPU, so it ends with the full, plain
    state dict under the ordinary keys (loadable into the user's class, strict) and the other ranks with ``{}``.
    Weights that train through the fake quantizer (the quantization-aware finish) are collapsed onto its grid, as
    :func:`~lightning_dwf.collapse_` collapses them.

    Args:
        module: the sharded, factorized model. threshold: see above. rank: this process's global rank.
    """
    tensors = {t.name: t for t in factorized_tensors(module)}
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in module.state_dict().items():
            match = _FACTOR_KEY.match(key)
            if match is None:
                value = full_tensor(value)
            elif match["index"] == "0":  # the weight goes where its first factor was, as in collapse_state_dict
                key = match["prefix"] + match["name"]
                tensor = tensors[key]
                bits = tensor.module.parametrizations[tensor.param_name][0].quant_bits
                weight = full_tensor(tensor.product().detach())
                value = threshold_(fake_quantize(weight, bits) if bits else weight, threshold)
            else:
                continue
            if rank == 0:
                state[key] = value.detach().cpu().clone()
    return state


def save_collapsed_sharded(trainer: pl.Trainer, module: pl.LightningModule, state: dict[str, torch.Tensor],
                           path: str) -> str:
    """Write ``state`` (rank zero's collapsed state dict) as a weights-only Lightning checkpoint at ``path``.

    ``MyModule.load_from_checkpoint(path)`` rebuilds the module from its saved hyperparameters and loads the weights
    (strict) without this package. Rank zero writes a temporary file and renames it; every rank waits. Returns
    ``path``.
    """
    if trainer.is_global_zero:
        checkpoint: dict[str, Any] = {
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "pytorch-lightning_version": pl.__version__,
            "state_dict": state,
        }
        if module.hparams:
            if hasattr(module, "_hparams_name"):
                checkpoint[module.CHECKPOINT_HYPER_PARAMS_NAME] = module._hparams_name
            checkpoint[module.CHECKPOINT_HYPER_PARAMS_KEY] = dict(module.hparams)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)
    trainer.strategy.barrier("dwf_collapsed_checkpoint")
    return path


def export_collapsed_sharded(trainer: pl.Trainer, state: dict[str, torch.Tensor], path: str,
                             bits: int | None) -> CompressionReport:
    """Write ``state`` (rank zero's collapsed state dict) with :func:`~lightning_dwf.export.io.save_state` on rank
    zero; every rank gets the report."""
    report = None
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        report = save_state(state, path, bits=bits)
    return trainer.strategy.broadcast(report)


def finish_sharded(trainer: pl.Trainer, module: pl.LightningModule, threshold: float, save: bool, path: str,
                   export_path: str | None, bits: int | None) -> tuple[str | None, CompressionReport | None]:
    """Fit end under ``ModelParallelStrategy``: zero the sharded factors of every weight below ``threshold``
    (absolute) in place, so the model keeps computing the collapsed function, then write the collapsed checkpoint
    (``save``) and the compressed export (``export_path``) from the gathered, collapsed state dict.

    Returns:
        The collapsed checkpoint's path and the export's report (None where not written).
    """
    fix_support_(module, threshold)
    state = full_collapsed_state_dict(module, threshold, trainer.global_rank)
    saved = save_collapsed_sharded(trainer, module, state, path) if save else None
    exported = export_collapsed_sharded(trainer, state, export_path, bits) if export_path else None
    return saved, exported


def factorize_before_sharding(module: nn.Module, depth: int, config: FactorizeConfig) -> list[str]:
    """``setup`` under ``ModelParallelStrategy`` (before ``configure_model`` shards): factorize the selected layers that
    exist already (built in ``__init__``); without any, leave it to ``configure_model`` (adopted at fit start).

    Returns:
        The qualified names factorized now (empty when deferred).

    Raises:
        ValueError: a selected weight is already sharded (with the fix), or the selection is invalid.
    """
    if config.structured:
        raise ValueError(
            "Structured DWF (FactorizeConfig(structure=...)) is not supported under ModelParallelStrategy yet: its "
            "group statistics and cuts are not reduced across shards. Use structure='elements', or train the "
            "structured model with DDP (strategy='ddp')."
        )
    types = config.layer_types or DEFAULT_LAYER_TYPES
    if not any(isinstance(m, types) for m in module.modules()):
        return []
    return factorize_(module, depth, config)
