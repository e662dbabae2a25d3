"""The sparse quantized decomposition."""
from lightning_dwf.decompose.decompose import *  # noqa: F401,F403
