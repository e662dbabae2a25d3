"""Figures of the studies (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Returns:
        The pyplot module.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: Path) -> Path:
    """Lay out, write (110 dpi) and close ``fig``.

    Args:
        fig: The figure.
        path: Where to write it.

    Returns:
        ``path``.
    """
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def dot_plot(
    points: list[tuple[str, float, str]], groups: dict[str, tuple[str, str]], path: Path, xlabel: str, title: str
) -> Path:
    """One labelled dot per row, top to bottom, coloured by group, with a line at 0.

    Args:
        points: ``(label, value, group)`` per row.
        groups: ``(colour, legend label)`` by group, in legend order.
        path: Where to write the figure.
        xlabel: The x axis' label.
        title: The title.

    Returns:
        ``path``.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.2 * len(points) + 1)))
    for group, (color, label) in groups.items():
        pts = [(i, v) for i, (_, v, g) in enumerate(points) if g == group]
        if pts:
            ax.scatter([v for _, v in pts], [i for i, _ in pts], color=color, s=14, label=label)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(points)), [p[0] for p in points], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    if points:
        ax.legend(fontsize=7)
    return save(fig, path)
