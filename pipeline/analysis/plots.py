"""Heatmaps of the layer analysis (matplotlib, no display needed) and the DVC plot of best layers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def heatmap(values: np.ndarray, rows: list[str], cols: list[str], title: str, path: Path,
            colorbar: str, mark_max: bool = False) -> Path:
    """A labelled (rows x cols) heatmap; values printed in the cells while they stay readable,
    NaN cells blank, and with ``mark_max`` each row's maximum outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.asarray(values, np.float64)
    n_rows, n_cols = values.shape
    fig, ax = plt.subplots(figsize=(2.5 + 0.45 * n_cols + 0.07 * max(map(len, rows), default=0),
                                    1.6 + 0.32 * n_rows), dpi=120)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", vmin=lo, vmax=hi if hi > lo else lo + 1e-9)
    ax.set_xticks(range(n_cols), cols, rotation=45 if max(map(len, cols), default=0) > 2 else 0, ha="right" if max(map(len, cols), default=0) > 2 else "center")
    ax.set_yticks(range(n_rows), rows)
    ax.set_xlabel("CLIP layer (block)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar, fraction=0.04, pad=0.02)
    if n_cols <= 30 and n_rows <= 60:
        mid = (lo + hi) / 2
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(values[i, j]):
                    ax.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="black" if values[i, j] > mid else "white")
    if mark_max:
        for i, row in enumerate(values):
            if np.isfinite(row).any():
                j = int(np.nanargmax(row))
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def best_layer_plot(best: dict[str, str], scores: dict[str, dict[str, float]], blocks: dict[str, tuple[int, ...]],
                    path: Path) -> Path:
    """``plots/best_layer.json`` for ``dvc plots``: one record per ROI, its best layer's centre block."""
    records = [
        {"roi": roi, "layer": layer, "block": float(np.mean(blocks[layer])) if blocks[layer] else None,
         "encoding_r": round(scores[roi][layer], 5)}
        for roi, layer in best.items()
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path
