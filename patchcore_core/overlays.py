"""Heatmap overlays of anomaly maps on test images, for the worst and the best scored cases of a test split."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_core.artifacts import atomic_write

__all__ = ["select_cases", "plot_overlays"]


def select_cases(labels: Any, scores: Any, k: int = 3) -> dict[str, list[int]]:
    """Indices of the `k` hardest and easiest images of each class.

    "worst": anomalous images with the lowest scores, then nominal images with the highest scores (the
    ones a threshold gets wrong first). "best": anomalous images with the highest scores, then nominal
    images with the lowest. Ties keep listing order.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    bad, good = np.flatnonzero(labels), np.flatnonzero(~labels)
    bad_up = bad[np.argsort(scores[bad], kind="stable")]
    good_up = good[np.argsort(scores[good], kind="stable")]
    return {
        "worst": [int(i) for i in (*bad_up[:k], *good_up[::-1][:k])],
        "best": [int(i) for i in (*bad_up[::-1][:k], *good_up[:k])],
    }


def _hwc(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
        image = np.moveaxis(image, 0, -1)
    return np.clip(image, 0.0, 1.0)


def plot_overlays(
    images: Any,
    maps: Any,
    masks: Any,
    captions: list[str],
    path: str | os.PathLike,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str = "",
) -> Path:
    """One PNG: per case a column with the image (ground-truth outline in green) over its heatmap overlay.

    `images` [n,3,S,S] or [n,S,S,3] in [0,1]; `maps` [n,S,S]; `masks` [n,S,S] in {0,1}. One colour scale
    (`vmin`..`vmax`, default the maps' range) is shared by all panels so cases compare directly.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    maps = np.asarray(maps, dtype=np.float32)
    masks = np.asarray(masks)
    n = len(maps)
    if not (len(images) == n == len(masks) == len(captions)):
        raise ValueError("images, maps, masks and captions must have the same length")
    vmin = float(maps.min()) if vmin is None and n else vmin
    vmax = float(maps.max()) if vmax is None and n else vmax
    fig = Figure(figsize=(2.4 * max(n, 1), 5.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, max(n, 1), squeeze=False)
    last = None
    for col in range(max(n, 1)):
        top, bottom = axes[0, col], axes[1, col]
        for ax in (top, bottom):
            ax.set_axis_off()
        if col >= n:
            continue
        img = _hwc(images[col])
        top.imshow(img)
        if masks[col].any():
            top.contour(masks[col] > 0, levels=[0.5], colors="lime", linewidths=1.0)
        top.set_title(captions[col], fontsize=8)
        bottom.imshow(img)
        last = bottom.imshow(maps[col], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
    if last is not None:
        fig.colorbar(last, ax=axes[1, :].tolist(), fraction=0.02, pad=0.01, label="anomaly score")
    if title:
        fig.suptitle(title)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path
