"""The report of a written file: per-tensor and whole-file sizes, the table, and LeNet-300-100's sizes on disk."""

from __future__ import annotations

import io
import os

import pytest
from safetensors import safe_open

from lightning_dwf.export import CompressionReport, load_compressed, save_compressed

from .helpers import assert_same_state, build, lenet, sparsify_


def test_report_sizes_and_table(tmp_path):
    model = sparsify_(build("batchnorm"), 0.5)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=8)
    assert isinstance(report, CompressionReport)
    rows = {t.name: t for t in report.tensors}
    conv = rows["0.weight"]
    assert conv.numel == 8 * 3 * 3 * 3 and conv.dense_bytes == conv.numel * 4
    assert conv.csr_bytes == conv.nonzero * 8 + (8 + 1) * 4
    assert rows["1.num_batches_tracked"].dense_bytes == 8 and rows["flags"].dense_bytes == 3
    assert report.dense_bytes == sum(t.dense_bytes for t in report.tensors)
    assert report.ratio == pytest.approx(report.dense_bytes / os.path.getsize(tmp_path / "m.safetensors"))
    assert report.header_bytes > 0
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format_version"] == "1" and meta["bits"] == "8" and meta["tool_version"]
    from rich.console import Console

    console = Console(record=True, width=200, file=io.StringIO())
    console.print(report.table())
    text = console.export_text()
    assert "0.weight" in text and "header" in text and "file" in text


@pytest.mark.parametrize(("bits", "min_ratio"), [(None, None), (8, 40.0), (4, 60.0)])
def test_lenet_300_100_at_98_percent_sizes_on_disk(tmp_path, bits, min_ratio):
    model = lenet(0.98)
    report = save_compressed(model, tmp_path / "m.safetensors", bits=bits)
    assert report.dense_bytes == (784 * 300 + 300 * 100 + 100 * 10 + 300 + 100 + 10) * 4
    print(f"\nLeNet-300-100 98 % bits={bits}: dense {report.dense_bytes} B, CSR {report.csr_bytes} B, "
          f"file {report.file_bytes} B, dense/file {report.ratio:.1f}x, CSR/file {report.csr_ratio:.2f}x")
    if min_ratio is None:
        assert report.file_bytes < report.csr_bytes
        fresh = lenet(0.5, seed=1)
        load_compressed(fresh, tmp_path / "m.safetensors")
        assert_same_state(fresh, model.state_dict())
    else:
        assert report.ratio >= min_ratio
