"""The test split's confusion matrix as a picture: <run>/confusion_matrix.png.

Each row is normalised to the true class's examples, so the diagonal reads as per-class accuracy
whatever the class sizes; the counts are written in the cells while they stay legible.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from transfer_cli.io import atomic_path

#: above this many classes the cells are too small for their counts and the axes for every name
LABELLED_CLASSES = 30


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> Figure:
    counts = np.asarray(matrix, dtype=np.int64)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2.0), 16.0)
    fig = Figure(figsize=(side + 1.2, side))
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= LABELLED_CLASSES:
        slanted = n > 8 and max(len(str(name)) for name in class_names) > 3
        ax.set_xticks(range(n), class_names, rotation=45 if slanted else 0, ha="right" if slanted else "center")
        ax.set_yticks(range(n), class_names)
        for (i, j), count in np.ndenumerate(counts):
            if count:
                ax.text(j, i, str(count), ha="center", va="center", fontsize="small",
                        color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"test confusion matrix ({int(counts.sum())} examples)")
    return fig


def write_confusion_png(path: Path, matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> None:
    figure = confusion_figure(matrix, class_names)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
