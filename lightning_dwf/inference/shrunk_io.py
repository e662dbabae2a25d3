"""Saving a shrunk model and loading it into a fresh instance of the user's class, without pickle.

The file is the compressed safetensors format of :func:`~lightning_dwf.save_state` (checksummed; lossless by default,
exact zeros stored sparsely), holding the shrunk weights, with the shrink history (which channels of which layers were
removed), the model's class and the example input's shape in its metadata. :func:`load_shrunk` shrinks a fresh
instance the same way, checks every name and shape against the file and only then fills it (``strict``): a wrong file
or another class raises :class:`~lightning_dwf.errors.DWFFileError` and leaves the module unchanged.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from torch import nn

from lightning_dwf.errors import DWFFileError
from lightning_dwf.export import CompressionReport, load_state, save_state
from lightning_dwf.inference.shrink import ShrinkReport, replay_shrink_

_HISTORY, _HEADS, _CLASS, _EXAMPLE = "dwf_shrink_history", "dwf_shrink_heads", "dwf_model_class", "dwf_example_input"
_ATTENTION = "dwf_shrink_attention"


def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def save_shrunk(
    model: nn.Module, path: str | os.PathLike[str], report: ShrinkReport, example_inputs: Any = None,
    *, bits: int | None = None,
) -> CompressionReport:
    """Write a model shrunk by :func:`~lightning_dwf.shrink_` to ``path`` (see the module docstring).

    Args:
        model: the shrunk model.
        path: the file to write.
        report: what :func:`~lightning_dwf.shrink_` returned for it (its history goes into the file).
        example_inputs: the example input the model was shrunk with; when it is one tensor its shape and dtype are
            stored, so :func:`load_shrunk` needs no input. Otherwise pass an input to :func:`load_shrunk`.
        bits: ``None`` (lossless, default), 8 or 4 (the per-channel grid of :func:`~lightning_dwf.save_compressed`).
    """
    metadata = {_HISTORY: report.history_json(), _HEADS: report.heads_json(), _ATTENTION: report.attention_json(),
                _CLASS: _class_name(model)}
    if torch.is_tensor(example_inputs):
        metadata[_EXAMPLE] = json.dumps({"shape": list(example_inputs.shape), "dtype": str(example_inputs.dtype)})
    return save_state(model.state_dict(), path, bits=bits, metadata=metadata)


def _example(metadata: dict[str, str], example_inputs: Any, path: str) -> Any:
    if example_inputs is not None:
        return example_inputs
    if _EXAMPLE not in metadata:
        raise DWFFileError(f"{path!r} stores no example input shape: pass `example_inputs=` (one input of the model, "
                           "as given to shrink_). Module unchanged.")
    spec = json.loads(metadata[_EXAMPLE])
    return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"].removeprefix("torch.")))


def load_shrunk(module: nn.Module, path: str | os.PathLike[str], example_inputs: Any = None) -> nn.Module:
    """Shrink ``module`` (a fresh instance of the class that was trained) as recorded in ``path`` and fill it.

    Args:
        module: a plain instance of the trained model's class (changed in place only when everything matches).
        path: a file written by :func:`save_shrunk`.
        example_inputs: an input for tracing; default: zeros of the shape stored in the file.

    Returns:
        ``module``, shrunk and loaded.

    Raises:
        DWFFileError: not a shrunk-model file, another class, or a name or shape that does not match after the shrink;
            the module is unchanged.
    """
    path = os.fspath(path)
    state, metadata = load_state(path)
    if _HISTORY not in metadata:
        raise DWFFileError(f"{path!r} is not a shrunk-model file (no shrink history); use load_compressed for files "
                           "from save_compressed. Module unchanged.")
    if metadata.get(_CLASS) != _class_name(module):
        raise DWFFileError(f"{path!r} holds a shrunk {metadata.get(_CLASS)}, not a {_class_name(module)}: load it into "
                           "an instance of the class that was trained. Module unchanged.")
    history = [(n, bool(o), list(i)) for n, o, i in json.loads(metadata[_HISTORY])]
    heads = {n: (attr, int(c)) for n, (attr, c) in json.loads(metadata.get(_HEADS, "{}")).items()}
    attention = [str(n) for n in json.loads(metadata.get(_ATTENTION, "[]"))]
    example = _example(metadata, example_inputs, path)
    trial = copy.deepcopy(module)
    try:
        replay_shrink_(trial, history, example, heads, attention)
    except Exception as err:  # the graph of this instance does not take the recorded shrink
        raise DWFFileError(f"{path!r}: the recorded shrink does not apply to this {type(module).__name__} ({err}). "
                           "Module unchanged.") from err
    expected = trial.state_dict()
    for name, value in expected.items():
        if name not in state:
            raise DWFFileError(f"{path!r} has no {name!r} for the shrunk model. Module unchanged.")
        if tuple(state[name].shape) != tuple(value.shape):
            raise DWFFileError(f"{path!r}: {name!r} has shape {tuple(state[name].shape)}, the shrunk model expects "
                               f"{tuple(value.shape)}. Module unchanged.")
    extra = [n for n in state if n not in expected]
    if extra:
        raise DWFFileError(f"{path!r} holds names the shrunk model lacks: {extra[:5]}. Module unchanged.")
    replay_shrink_(module, history, example, heads, attention)
    module.load_state_dict(state, strict=True)
    return module
