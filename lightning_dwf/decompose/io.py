"""The decomposition's file: the effective factors of each decomposed weight, stored beside every other
``state_dict()`` entry in the package's compressed format (:mod:`lightning_dwf.export`), so each factor gets the
cheapest sparse encoding and its values the per-row integer grid; a JSON metadata entry names the decomposed layers."""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Literal

from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_dwf.decompose.parametrization import (
    DecomposedTensor,
    LowRankProduct,
    collapse_decomposed_,
    decomposed_tensors,
    register_decomposition,
)
from lightning_dwf.decompose.report import DecomposedFileReport
from lightning_dwf.errors import DWFFileError
from lightning_dwf.export import load_state, save_state

__all__ = ["QSD_METADATA_KEY", "U_SUFFIX", "V_SUFFIX", "load_decomposed", "save_decomposed"]

#: Metadata key of a :func:`save_decomposed` file: JSON ``{tensor name: {"shape", "dtype", "rank", "bits"}}``.
QSD_METADATA_KEY = "qsd"
#: Names of the stored factors of a decomposed tensor ``<name>``: ``<name>.qsd_u`` and ``<name>.qsd_v``.
U_SUFFIX, V_SUFFIX = ".qsd_u", ".qsd_v"


def _plain_and_factors(module: nn.Module) -> tuple[list[DecomposedTensor], dict[str, Tensor]]:
    """The decomposed tensors and the state dict to store: factors as ``<name>.qsd_u/_v`` in place of the weight."""
    tensors = decomposed_tensors(module)
    owned = {}
    for t in tensors:
        prefix = t.name[: len(t.name) - len(t.param_name)]
        owned[f"{prefix}parametrizations.{t.param_name}."] = t
    state: dict[str, Tensor] = {}
    for key, value in module.state_dict().items():
        owner = next((t for p, t in owned.items() if key.startswith(p)), None)
        if owner is None:
            state[key] = value
        elif owner.name + U_SUFFIX not in state:
            u, v = owner.factors()
            state[owner.name + U_SUFFIX], state[owner.name + V_SUFFIX] = u.contiguous(), v.contiguous()
    return tensors, state


def save_decomposed(
    module: nn.Module, path: str | os.PathLike[str], *, bits: int | None | Literal["factors"] = "factors"
) -> DecomposedFileReport:
    """Write a decomposed module to one compressed file; ``file_bytes`` is its true size on disk.

    The effective factors (masked, on their grid) are stored as 2-D tensors ``<name>.qsd_u`` / ``<name>.qsd_v``
    in place of each decomposed weight, with every other ``state_dict()`` entry, through
    :func:`lightning_dwf.export.save_state` (cheapest sparse encoding per tensor, per-row integers with ``bits``).
    The JSON metadata ``qsd`` lists the decomposed tensors (shape, dtype, rank, bits).

    Args:
        module: a module decomposed by :func:`decompose_` (possibly fine-tuned); other parametrizations refused.
        path: the file to write (``*.safetensors``).
        bits: the file's quantization, applied to EVERY weight in it (the format has one ``bits`` per file), also
            to layers left dense. ``"factors"`` (default) uses the factors' own ``bits`` (then they are stored
            exactly, as integers on their grid); ``None`` stores everything losslessly (factors as float32 values).

    Returns:
        The sizes, measured on the written file, and the dense float32 size of the model.

    Raises:
        ValueError: nothing is decomposed; another parametrization is present; layers disagree on ``bits`` with
            ``bits="factors"``; ``bits`` is not None, 8, 4 or ``"factors"``.
    """
    tensors, state = _plain_and_factors(module)
    if not tensors:
        raise ValueError("`module` has no decomposed tensor: call `decompose_` first, or use `save_compressed` for a "
                         "plain module.")
    others = [n or "<root>" for n, m in module.named_modules()
              if parametrize.is_parametrized(m) and any(not isinstance(pl[0], LowRankProduct) or len(pl) != 1
                                                        for pl in m.parametrizations.values())]
    if others:
        raise ValueError(f"`module` has other parametrizations ({', '.join(others[:3])}); call "
                         "`lightning_dwf.collapse_(module)` on DWF factors first.")
    if bits == "factors":
        found = {t.parametrization.bits for t in tensors}
        if len(found) > 1:
            raise ValueError(f"The decomposed layers use different `bits` {sorted(found, key=str)}: pass `bits=` "
                             "explicitly (the file has one bits for every weight).")
        bits = found.pop()
    layers = {t.name: {"shape": list(t.parametrization.shape), "dtype": str(t.parametrization.weight_dtype)
                       .removeprefix("torch."), "rank": t.parametrization.rank, "bits": t.parametrization.bits}
              for t in tensors}
    report = save_state(state, path, bits=bits, metadata={QSD_METADATA_KEY: json.dumps(layers)})  # checks bits
    dense = sum(math.prod(info["shape"]) * 4 for info in layers.values())
    dense += sum(r.dense_bytes for r in report.tensors if not r.name.endswith((U_SUFFIX, V_SUFFIX)))
    return DecomposedFileReport(report, tuple(layers), dense)


def _read(path: str) -> tuple[dict[str, Tensor], dict[str, dict[str, Any]], int | None]:
    """The decoded tensors, the ``qsd`` layer table and the file's ``bits``; any defect of the file as DWFFileError."""
    try:
        stored, metadata = load_state(path)
    except DWFFileError:
        raise
    except ValueError as exc:  # not a readable file of the format, corrupt: a wrong file all the same
        raise DWFFileError(str(exc)) from exc
    if QSD_METADATA_KEY not in metadata:
        raise DWFFileError(f"{path!r} was not written by save_decomposed (no {QSD_METADATA_KEY!r} metadata); read it "
                           "with `load_compressed`.")
    try:
        layers = json.loads(metadata[QSD_METADATA_KEY])
        file_bits = None if metadata["bits"] == "none" else int(metadata["bits"])
        for info in layers.values():
            info["shape"] = tuple(int(n) for n in info["shape"])
            if info["bits"] not in (None, 8, 4):
                raise ValueError(f"bits {info['bits']!r}")
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise DWFFileError(f"{path!r} has a malformed {QSD_METADATA_KEY!r} header ({exc}).") from exc
    return stored, layers, file_bits


def load_decomposed(module: nn.Module, path: str | os.PathLike[str], *, collapse: bool = False) -> nn.Module:
    """Fill a fresh plain module of the same architecture, in place, from a :func:`save_decomposed` file.

    Every decomposed tensor gets its :class:`LowRankProduct` back, with the stored factors (masks: their non-zeros;
    grid: the file's ``bits`` or the layer's, whichever is coarser), so the loaded module computes exactly what the
    file holds and can be fine-tuned further; with ``collapse=True`` the products are then collapsed into plain
    dense weights (:func:`collapse_decomposed_`). The file is read, checked and matched against the module before
    the module is touched: on any error it is unchanged.

    The argument order is that of :func:`save_decomposed` (and of safetensors' ``load_model(model, filename)``);
    the old order ``load_decomposed(path, module)`` still works with a ``FutureWarning`` for one release.

    Args:
        module: a plain (not parametrized) module with the same architecture as the saved one.
        path: a file written by :func:`save_decomposed`.
        collapse: return plain dense weights instead of the decomposed structure.

    Returns:
        ``module``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DWFFileError: (a ValueError) not a readable file of the format, corrupt, not written by
            :func:`save_decomposed`, or not matching ``module`` (the message names the first mismatch).
        ValueError: ``module`` is parametrized.
    """
    if isinstance(module, (str, os.PathLike)) and isinstance(path, nn.Module):
        warnings.warn("load_decomposed(path, module) is deprecated: call load_decomposed(module, path), the order of "
                      "save_decomposed(module, path). The old order stops working in the next release.",
                      FutureWarning, stacklevel=2)
        module, path = path, module
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}. Call "
                        "load_decomposed(module, path).")
    if any(parametrize.is_parametrized(m) for m in module.modules()):
        raise ValueError("`module` is parametrized; load_decomposed fills a fresh plain module of the same "
                         "architecture.")
    path = os.fspath(path)
    stored, layers, file_bits = _read(path)

    def mismatch(problem: str) -> DWFFileError:
        return DWFFileError(f"{path!r} does not match the module: {problem}. Module unchanged.")

    state = module.state_dict()
    unknown = [n for n in layers if n not in state]
    if unknown:
        raise mismatch(f"the module has no {unknown[0]!r}")
    plain: dict[str, Tensor] = {}
    factors: dict[str, tuple[Tensor, Tensor, int | None]] = {}
    for name, value in state.items():
        shape = tuple(value.shape)
        if name in layers:
            u, v = stored.get(name + U_SUFFIX), stored.get(name + V_SUFFIX)
            info = layers[name]
            if u is None or v is None:
                raise mismatch(f"the file lacks the factors of {name!r}")
            if (info["shape"] != shape or u.dim() != 2 or v.dim() != 2 or u.shape[1] != v.shape[0]
                    or u.shape[0] != shape[0] or u.shape[0] * v.shape[1] != value.numel()):
                raise mismatch(f"{name!r} has shape {info['shape']} (factors {tuple(u.shape)} @ {tuple(v.shape)}) "
                               f"in the file, {shape} in the module")
            bits = info["bits"]
            if file_bits is not None and (bits is None or file_bits < bits):
                bits = file_bits
            factors[name] = (u, v, bits)
        elif name not in stored:
            raise mismatch(f"the file has no {name!r}")
        elif tuple(stored[name].shape) != shape or stored[name].dtype != value.dtype:
            raise mismatch(f"{name!r} is {stored[name].dtype} {tuple(stored[name].shape)} in the file, "
                           f"{value.dtype} {shape} in the module")
        else:
            plain[name] = stored[name]
    expected = set(plain) | {n + s for n in factors for s in (U_SUFFIX, V_SUFFIX)}
    extra = [n for n in stored if n not in expected]
    if extra:
        raise mismatch(f"the module has no {extra[0]!r}")
    owners = dict(module.named_modules())
    result = module.load_state_dict(plain, strict=False)
    if result.unexpected_keys or set(result.missing_keys) != set(factors):  # pragma: no cover (checked above)
        raise ValueError(f"{path!r}: unexpected state dict mismatch {result}.")
    for name, (u, v, bits) in factors.items():
        mod_name, _, pname = name.rpartition(".")
        register_decomposition(owners[mod_name], pname, u, v, bits)
    if collapse:
        collapse_decomposed_(module)
    return module
