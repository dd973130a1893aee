"""The training stage's figures, each written atomically: the reliability diagram (importance's is drawn by
predictor.importance)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from speckv.profiling.atomic import atomic_path


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write `fig` to `path` atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def reliability_figure(y: np.ndarray, predictions: dict[str, np.ndarray], bins: int = 10) -> plt.Figure:
    """Mean label per bin of predicted probability (uniform bins), one line per model."""
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for name, p in predictions.items():
        which = np.clip(np.digitize(p, edges) - 1, 0, bins - 1)
        filled = [b for b in range(bins) if (which == b).any()]
        ax.plot(
            [p[which == b].mean() for b in filled],
            [y[which == b].mean() for b in filled],
            marker="o",
            label=name,
        )
    ax.set_xlabel("predicted acceptance")
    ax.set_ylabel("observed acceptance (test prompts)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
