"""Grouping rows over seeds and formatting their accuracies for markdown tables."""

from __future__ import annotations

import json
import math
from collections import defaultdict

from lightning_dwf.config import DEFAULT_LAM_RECOVERY


def by_config(rows: list[dict]) -> list[list[dict]]:
    """The runs of each config that differ only in ``seed``.

    Args:
        rows: Result rows.

    Returns:
        One list of rows per config, in first-seen order.
    """
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[json.dumps({k: v for k, v in r["config"].items() if k != "seed"}, sort_keys=True)].append(r)
    return list(groups.values())


def aggregate(rows: list[dict]) -> list[dict]:
    """One row per config over its seeds (:func:`by_config`).

    Args:
        rows: Result rows with ``acc`` and ``compression_ratio`` (None for a diverged run).

    Returns:
        Rows whose results are the mean ``acc``, ``compression_ratio`` and ``sparsity`` with ``n``, ``acc_sd`` and
        the mean ``train_seconds``; a config with a diverged seed gets ``acc=None`` and ``diverged``.
    """
    out = []
    for runs in by_config(rows):
        ok = [r["results"] for r in runs if r["results"]["acc"] is not None]
        if len(ok) < len(runs):
            diverged = f"{len(runs) - len(ok)} of {len(runs)} seeds" if len(runs) > 1 else "1 run"
            out.append(
                dict(
                    config=runs[0]["config"],
                    results=dict(acc=None, compression_ratio=None, n=len(runs), diverged=diverged),
                )
            )
            continue
        mean = {
            k: sum(r[k] for r in ok) / len(ok)
            for k in ("acc", "compression_ratio", "sparsity")
            if all(k in r for r in ok)
        }
        sd = math.sqrt(sum((r["acc"] - mean["acc"]) ** 2 for r in ok) / (len(ok) - 1)) if len(ok) > 1 else 0.0
        seconds = sum(r.get("train_seconds", 0) for r in ok) / len(ok)
        out.append(dict(config=runs[0]["config"], results=dict(mean, n=len(ok), acc_sd=sd, train_seconds=seconds)))
    return out


def mean_acc(runs: list[dict]) -> float | None:
    """The mean accuracy of ``runs``.

    Args:
        runs: Result rows.

    Returns:
        The mean, or None if there are none or one has no accuracy.
    """
    accs = [r["results"].get("acc") for r in runs]
    return sum(accs) / len(accs) if accs and all(a is not None for a in accs) else None


def fmt_acc(runs: list[dict]) -> str:
    """The accuracy (%) of the seeds of one method in one cell.

    Args:
        runs: Result rows.

    Returns:
        ``88.12`` for one seed, ``88.10 (88.0 / 88.2 / 88.1)`` for several, ``diverged`` / ``error`` / ``—``.
    """
    if not runs:
        return "—"
    runs = sorted(runs, key=lambda r: r["config"]["seed"])
    per_seed = [
        "diverged"
        if "diverged" in r["results"] and r["results"].get("acc") is None
        else "error"
        if r["results"].get("acc") is None
        else f"{100 * r['results']['acc']:.2f}"
        for r in runs
    ]
    mean = mean_acc(runs)
    if len(runs) == 1:
        return per_seed[0]
    return (f"{100 * mean:.2f}" if mean is not None else "—") + " (" + " / ".join(per_seed) + ")"


def fmt_cr(cr: float) -> str:
    """A compression ratio for a table.

    Args:
        cr: The ratio.

    Returns:
        One decimal, ``∞`` for a net without non-zeros.
    """
    return "∞" if math.isinf(cr) else f"{cr:.1f}"


def parse_recovery(text: str) -> float:
    """A ``--recovery`` argument: a fraction for ``FixedLamConfig(recovery=...)``; ``"default"`` is the library's
    default (:data:`~lightning_dwf.config.DEFAULT_LAM_RECOVERY`), stored as its value."""
    return DEFAULT_LAM_RECOVERY if text == "default" else float(text)


def row_recovery(config: dict) -> float:
    """A fixed-λ config's ``FixedLamConfig(recovery=...)``: configs without the key ran a constant λ (0)."""
    return float(config.get("recovery", 0.0))


def recovery_text(config: dict) -> str:
    """A table cell for a fixed-λ config's recovery (0: a constant λ)."""
    return f"{row_recovery(config):g}"
