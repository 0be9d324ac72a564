"""Figures written by training and comparison runs (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def shorten_label(label: str, limit: int = 32) -> str:
    """Cut a long label (such as an SNI task name) to ``limit`` characters, ending in an ellipsis."""
    return label if len(label) <= limit else label[: limit - 1] + "\u2026"


def routing_heatmap(
    matrix: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    path: Union[str, Path],
    title: str,
    column_label: str = "expert",
) -> Path:
    """Save a rows x experts heatmap of routing weights with the values written in the cells."""
    path = Path(path)
    rows, columns = len(matrix), len(matrix[0]) if matrix else 0
    labels = [shorten_label(label) for label in row_labels]
    label_width = 0.07 * max((len(label) for label in labels), default=4)
    figure, axes = plt.subplots(figsize=(2.5 + label_width + 0.75 * max(columns, 2), 1.2 + 0.42 * max(rows, 2)))
    image = axes.imshow(matrix, aspect="auto", cmap="viridis")
    axes.set_xticks(range(columns), [str(index) for index in range(columns)])
    axes.set_yticks(range(rows), labels, fontsize=8)
    axes.set_xlabel(column_label)
    axes.set_title(title, fontsize=10)
    largest = max((max(row) for row in matrix), default=1.0)
    for row_index, row in enumerate(matrix):
        for column_index, value in enumerate(row):
            colour = "black" if value > 0.6 * largest else "white"
            axes.text(column_index, row_index, f"{value:.3f}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, label="mean routing weight")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def grouped_bars(
    groups: Sequence[str],
    series: dict[str, Sequence[float]],
    path: Union[str, Path],
    title: str,
    ylabel: str,
    errors: Optional[dict[str, Sequence[float]]] = None,
) -> Path:
    """Save a grouped bar chart: one group per entry of ``groups``, one bar per series."""
    path = Path(path)
    names = list(series)
    width = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) * max(len(names), 1) * 0.5 + 2), 4.5))
    for position, name in enumerate(names):
        offsets = [index + (position - (len(names) - 1) / 2) * width for index in range(len(groups))]
        yerr = errors.get(name) if errors else None
        axes.bar(offsets, series[name], width=width, label=name, yerr=yerr, capsize=2)
    axes.set_xticks(range(len(groups)), [shorten_label(group) for group in groups], rotation=40, ha="right", fontsize=8)
    axes.set_ylabel(ylabel)
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
