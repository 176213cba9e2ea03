"""PNG plots of metric curves (training and validation), shared by ``meta-train`` and ``finetune``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

#: One curve: its legend label and its ``(x, y)`` points.
Curve = tuple[str, Sequence[tuple[float, float]]]


def pyplot() -> Any:
    """Return ``matplotlib.pyplot`` on the non-interactive ``Agg`` backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_curve_plots(folder: Path, panels: Sequence[tuple[str, str, Sequence[Curve]]], xlabel: str) -> list[Path]:
    """Write one line chart per panel into ``folder`` (created).

    Args:
        folder: Where the PNG files go.
        panels: ``(file name, title, curves)``; a curve without points is left out, a panel
            without any point is not written.
        xlabel: Label of the x axis (the step).

    Returns:
        The files written.
    """
    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, title, curves in panels:
        if not any(points for _, points in curves):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for label, points in curves:
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    return written
