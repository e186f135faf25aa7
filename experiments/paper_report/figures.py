"""The report's figures: image-level ROC / PR curves of several methods (the supplement's fig. S3) and a grid of
anomaly-map overlays. matplotlib `Figure` objects (no pyplot state); PNGs palette-quantised to stay small.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from patchcore_core.artifacts import atomic_write

__all__ = ["plot_roc_pr_methods", "plot_heatmap_grid", "heatmap_cases"]


def heatmap_cases(test_samples, rows: int) -> list[int]:
    """The first image of each defect type (up to rows − 1 types), then the first good image."""
    first: dict[str, int] = {}
    for i, s in enumerate(test_samples):
        first.setdefault(s.defect_type, i)
    good = first.pop("good", None)
    cases = list(first.values())[: max(1, rows - 1)]
    if good is not None:
        cases.append(good)
    return cases


def _save_small_png(fig, path: Path, max_bytes: int = 190_000, dpi: int = 80) -> Path:
    """Render `fig`, quantise to 256 colours and save; shrink until the PNG is under `max_bytes`."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    scale = 1.0
    while True:
        im = image if scale == 1.0 else image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or scale < 0.3:
            break
        scale *= 0.85
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def plot_roc_pr_methods(labels: np.ndarray, scores: dict[str, np.ndarray], path: str | os.PathLike,
                        title: str = "") -> Path:
    """Image-level ROC (left) and precision-recall (right) curves of several methods in one PNG."""
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

    from patchcore_core.metrics import error_at_full_recall, f1_optimal_threshold

    labels = np.asarray(labels).astype(int)
    fig = Figure(figsize=(10, 4.2))
    ax_roc, ax_pr = fig.subplots(1, 2)
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(labels, s)
        precision, recall, _ = precision_recall_curve(labels, s)
        f1 = f1_optimal_threshold(labels, s)
        full = error_at_full_recall(labels, s)
        (line,) = ax_roc.plot(fpr, tpr, lw=1.6, label=f"{name}: AUROC {100 * roc_auc_score(labels, s):.1f}")
        ax_pr.plot(recall, precision, lw=1.6, color=line.get_color(), drawstyle="steps-post",
                   label=f"{name}: F1-opt. errors {f1['misclassified']}, "
                         f"FPR@100% recall {full['false_positive_rate']:.2f}")
        ax_pr.plot([f1["recall"]], [f1["precision"]], "o", ms=4, color=line.get_color())
    ax_roc.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (dot: F1-optimal)", xlim=(0, 1.02),
              ylim=(0, 1.02))
    ax_roc.legend(loc="lower right", fontsize=7)
    ax_pr.legend(loc="lower left", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_small_png(fig, Path(path))


def plot_heatmap_grid(images: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray], cases: list[int],
                      captions: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Rows = test cases; columns = the image (ground truth outlined) and each method's heatmap overlay.

    `images` [n,3,S,S] in [0,1] and `masks` [n,S,S] are the selected cases; `maps[method]` holds the
    method's maps for the whole test split ([N,S,S]) so each method gets one colour scale (its test range).
    """
    from matplotlib.figure import Figure

    n, cols = len(cases), 1 + len(maps)
    fig = Figure(figsize=(1.55 * cols, 1.6 * n + 0.4))
    axes = np.atleast_2d(fig.subplots(n, cols))
    scales = {m: (float(v.min()), float(np.percentile(v, 99.9))) for m, v in maps.items()}
    for r, idx in enumerate(cases):
        img = np.moveaxis(np.clip(images[r], 0, 1), 0, -1)
        ax = axes[r, 0]
        ax.imshow(img)
        if masks[r].any():
            ax.contour(masks[r], levels=[0.5], colors="lime", linewidths=0.7)
        ax.set_ylabel(captions[r], fontsize=7)
        for c, (name, m) in enumerate(maps.items(), start=1):
            vmin, vmax = scales[name]
            axes[r, c].imshow(img)
            axes[r, c].imshow(m[idx], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
            if masks[r].any():
                axes[r, c].contour(masks[r], levels=[0.5], colors="white", linewidths=0.5)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image / GT", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save_small_png(fig, Path(path))
