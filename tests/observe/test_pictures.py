"""The picture cadence of ``lightning_dwf.observe.pictures``: ``log_pictures`` is validated and mapped to a cadence (the
pictures a fit writes are tested in ``tests/callbacks/test_pictures_through_trainer.py``)."""

from __future__ import annotations

import pytest

from lightning_dwf import DWFCallback
from lightning_dwf.observe.pictures import picture_cadence


@pytest.mark.parametrize("bad", [0, -3, 2.5, "yes"])
def test_log_pictures_is_validated(bad):
    with pytest.raises(ValueError, match="log_pictures"):
        DWFCallback(depth=3, lam=0.01, log_pictures=bad)
    assert picture_cadence(True) == 0 and picture_cadence(False) == -1
