"""The resumable JSONL result store: one row per run (``config``, ``results``, ``versions``, ``machine``,
``finished``), keyed by its config, so that a study re-run skips what is already there."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

#: Where the studies keep their rows, tables and plots.
RESULTS = Path(__file__).parent.parent / "results"
#: The packages whose versions a row records by default.
PACKAGES = ("torch", "lightning", "torchao", "lightning-dwf")


def key(cfg: dict[str, Any]) -> str:
    """The identity of a config: its JSON with sorted keys.

    Args:
        cfg: The config.

    Returns:
        The key.
    """
    return json.dumps(cfg, sort_keys=True)


def read_rows(path: Path) -> list[dict]:
    """Every row of ``path``, in file order (several seeds or repeats of a config included).

    Args:
        path: The ``.jsonl`` file.

    Returns:
        The rows.
    """
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_rows(path: Path) -> dict[str, dict]:
    """The rows already in ``path``, by config key (a later row of the same config wins).

    Args:
        path: The ``.jsonl`` file; missing means no rows yet.

    Returns:
        The rows by :func:`key` of their config, in file order.
    """
    if not path.exists():
        return {}
    return {key(row["config"]): row for row in read_rows(path)}


def versions(packages: Iterable[str] = PACKAGES) -> dict[str, str]:
    """The installed versions of ``packages`` (those not installed are left out).

    Args:
        packages: Distribution names.

    Returns:
        Version by name.
    """
    out = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def machine() -> dict[str, Any]:
    """What a run's last bits depend on besides the code and the versions: the CPU, the kernels torch dispatched to
    on it (``AVX2``, ``AVX512``, ...) and the threads. A chaotic cell (99.5 % with ModelPruning, long runs) can end
    points apart on two machines from the same code, so a row that does not reproduce is told apart from a code change
    by these.

    Returns:
        ``cpu`` (the model name, ``""`` where unknown), ``cores``, ``isa``, ``threads``.
    """
    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count() or 0, isa=torch.backends.cpu.get_cpu_capability(),
                threads=torch.get_num_threads())


def make_row(cfg: dict[str, Any], results: dict[str, Any], packages: Iterable[str] = PACKAGES) -> dict[str, Any]:
    """One run's row, stamped with the package versions, the machine (:func:`machine`) and the time.

    Args:
        cfg: The config.
        results: What the run measured.
        packages: Whose versions to record.

    Returns:
        ``config``, ``results``, ``versions``, ``machine``, ``finished``.
    """
    return dict(config=cfg, results=results, versions=versions(packages), machine=machine(),
                finished=time.strftime("%Y-%m-%dT%H:%M:%S"))


def append_rows(path: Path, rows: Iterable[dict]) -> None:
    """Append ``rows`` to ``path``, one JSON line each.

    Args:
        path: The ``.jsonl`` file (created if missing; its folder must exist).
        rows: The rows.
    """
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def retire_stale(path: Path, done: dict[str, dict], dataset: str, model: str, current: set[str]) -> None:
    """Move the rows of ``dataset``/``model`` whose key is not in ``current`` (an older recipe) to
    ``<stem>_superseded.jsonl``.

    Keeps the results file equal to what the current code would produce; the old rows stay on record.

    Args:
        path: The results file, rewritten from ``done`` if anything moved.
        done: Its rows by key; the retired ones are removed.
        dataset: The setting's dataset.
        model: The setting's model.
        current: The keys the study defines for this setting now.
    """
    stale = [
        k
        for k, row in done.items()
        if (row["config"]["dataset"], row["config"]["model"]) == (dataset, model) and k not in current
    ]
    if not stale:
        return
    append_rows(path.with_name(f"{path.stem}_superseded.jsonl"), (done.pop(k) for k in stale))
    path.write_text("".join(json.dumps(row) + "\n" for row in done.values()))
    print(f"{dataset} {model}: {len(stale)} rows of an older recipe moved to {path.stem}_superseded.jsonl", flush=True)
