"""Export: the compressed file format of collapsed models."""
from lightning_dwf.export.compressed import *  # noqa: F401,F403
