"""Export: one compressed safetensors file for a collapsed (plain, sparse) model, checked when it is loaded.

Layout (``format = "lightning-dwf-compressed"``, ``format_version = "1"``, :mod:`~lightning_dwf.export.format`): one
safetensors file whose string metadata holds ``format``, ``format_version``, ``bits``, ``tool_version``, a JSON
``manifest`` (per ``state_dict()`` tensor: name, dtype, shape, encoding and its streams) and ``sha256``, the checksum
of the metadata and every stored byte. Each tensor ``name`` is stored as safetensors tensors ``name:<stream>``:

* ``raw``: everything that is not a floating-point tensor with >= 2 dims (biases, norm parameters, buffers) is
  stored as-is, losslessly.
* weights (floating point, >= 2 dims) get the smallest registered encoding
  (:mod:`~lightning_dwf.export.encodings`: ``dense``, ``mask``, ``rel8``, ``rel4``, or one added with
  :func:`register_encoding`) of their values: the weight itself (``bits=None``, exact) or per-row symmetric integer
  codes with float32 ``scales`` (``bits=8`` or ``4``, :mod:`~lightning_dwf.export.values`).

Each stream is entropy-coded (raw deflate, with or without a byte shuffle; lzma tried on the winner,
:mod:`~lightning_dwf.export.codecs`) only where that makes it smaller; the codec is recorded per stream. The pattern
is ``w != 0`` (NaN is stored, ``-0.0`` counts as a zero and loads as ``+0.0`` unless ``dense`` wins), so
``bits=None`` round trips every value exactly in its dtype. Saving and loading are in :mod:`~lightning_dwf.export.io`,
the sizes in :mod:`~lightning_dwf.export.report`.
"""

from lightning_dwf.export.encodings import (
    EncodedWeight,
    Encoding,
    decode_weight,
    encode_weight,
    register_encoding,
    unregister_encoding,
)
from lightning_dwf.export.format import FORMAT, FORMAT_VERSION
from lightning_dwf.export.io import load_compressed, load_state, save_compressed, save_state
from lightning_dwf.export.report import CompressionReport, TensorSize
from lightning_dwf.export.values import StoredWeight, WeightValues

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "CompressionReport",
    "EncodedWeight",
    "Encoding",
    "StoredWeight",
    "TensorSize",
    "WeightValues",
    "decode_weight",
    "encode_weight",
    "load_compressed",
    "load_state",
    "register_encoding",
    "save_compressed",
    "save_state",
    "unregister_encoding",
]
