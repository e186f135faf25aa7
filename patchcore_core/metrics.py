"""Evaluation metrics: image/pixel AUROC, MVTec AU-PRO, F1-optimal threshold, error at full recall, figures.

Every curve here uses the convention "predict anomalous when score >= threshold" and label 1 = anomalous.
Pixel metrics are computed exactly (one sort of all pixel scores, ties grouped), which needs only a few
bytes per pixel: about 0.3 GB for 200 test images of 224x224.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from patchcore_core.artifacts import atomic_write

__all__ = [
    "image_auroc",
    "pixel_auroc",
    "pro_curve",
    "au_pro",
    "f1_optimal_threshold",
    "error_at_full_recall",
    "compute_metrics",
    "plot_roc_pr",
    "plot_pro_curve",
]

# 8-connectivity for ground-truth regions, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


# ---------------------------------------------------------------------------------------------------------
# input checks


def _check_image_inputs(labels: Any, scores: Any, need_both: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Return (labels as bool [N], scores as float [N]) after checking shape, values and finiteness."""
    labels_arr = np.asarray(labels).reshape(-1)
    scores_arr = np.asarray(scores, dtype=np.float64).reshape(-1)
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(
            f"labels and scores differ in length: {labels_arr.shape[0]} vs {scores_arr.shape[0]}"
        )
    if labels_arr.size == 0:
        raise ValueError("labels and scores are empty")
    if not np.isin(labels_arr, (0, 1)).all():
        raise ValueError(f"labels must be 0 (nominal) or 1 (anomalous); got values {np.unique(labels_arr)}")
    if not np.isfinite(scores_arr).all():
        raise ValueError("scores contain NaN or infinite values")
    positive = labels_arr.astype(bool)
    if need_both and (positive.all() or not positive.any()):
        raise ValueError(
            "image metrics need both nominal (0) and anomalous (1) images; "
            f"got only label {int(positive[0])} ({positive.size} images)"
        )
    return positive, scores_arr


def _check_pixel_inputs(masks: Any, maps: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (masks as bool [N,H,W], maps as float [N,H,W]); a single [H,W] pair counts as one image."""
    masks_arr = np.asarray(masks)
    maps_arr = np.asarray(maps)
    if masks_arr.shape != maps_arr.shape:
        raise ValueError(f"masks and maps differ in shape: {masks_arr.shape} vs {maps_arr.shape}")
    if masks_arr.ndim == 2:
        masks_arr, maps_arr = masks_arr[None], maps_arr[None]
    if masks_arr.ndim != 3 or masks_arr.size == 0:
        raise ValueError(f"masks and maps must be non-empty [N,H,W] arrays; got shape {masks_arr.shape}")
    # Keep float32/float64 as given (no copy of a 10M-pixel stack); widen anything else.
    if maps_arr.dtype not in (np.float32, np.float64):
        maps_arr = maps_arr.astype(np.float64)
    if not np.isfinite(maps_arr).all():
        raise ValueError("anomaly maps contain NaN or infinite values")
    return masks_arr > 0, maps_arr


# ---------------------------------------------------------------------------------------------------------
# shared machinery: sort once, group tied scores


def _descending_groups(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort `scores` descending; return (order, sorted scores, index of the last element of each tie group).

    Cumulative sums over the sorted order read at the group ends give, per distinct threshold t (descending),
    the totals over all elements with score >= t.
    """
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    ends = np.flatnonzero(sorted_scores[1:] != sorted_scores[:-1])
    ends = np.append(ends, sorted_scores.size - 1)
    return order, sorted_scores, ends


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the curve (x nondecreasing, x[0] <= x_max <= x[-1]) from x[0] to x_max.

    The point at exactly x_max is linearly interpolated, as in the MVTec AD reference `trapezoid`.
    """
    n = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max (a prefix)
    area = float(np.sum(0.5 * (y[1:n] + y[: n - 1]) * (x[1:n] - x[: n - 1])))
    if x[n - 1] < x_max and n < x.size:
        x0, y0, x1, y1 = x[n - 1], y[n - 1], x[n], y[n]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += float(0.5 * (y0 + y_at) * (x_max - x0))
    return area


# ---------------------------------------------------------------------------------------------------------
# AUROC


def image_auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve of image scores (label 1 = anomalous); ties count one half."""
    positive, scores_arr = _check_image_inputs(labels, scores)
    return float(roc_auc_score(positive, scores_arr))


def pixel_auroc(masks: Any, maps: Any) -> float:
    """Exact ROC AUC over all pixels of all images (mask > 0 = anomalous pixel), ties counting one half.

    Computed from one descending sort with tied scores grouped, so memory stays at a few bytes per pixel
    (sklearn's roc_auc_score gives the same number but keeps several float64 copies of every pixel).
    """
    masks_b, maps_f = _check_pixel_inputs(masks, maps)
    positive = masks_b.reshape(-1)
    num_pos = int(np.count_nonzero(positive))
    num_neg = positive.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"pixel AUROC needs both anomalous and normal pixels; got {num_pos} anomalous, {num_neg} normal"
        )
    order, _, ends = _descending_groups(maps_f.reshape(-1))
    tp = np.cumsum(positive[order], dtype=np.int64)[ends]
    del order
    fp = (ends + 1) - tp
    tp = np.concatenate(([0], tp)).astype(np.float64)
    fp = np.concatenate(([0], fp)).astype(np.float64)
    # Trapezoids over the ROC staircase in counts: equals the Mann-Whitney U statistic with ties = 1/2.
    area = np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / 2.0
    return float(area / (float(num_pos) * float(num_neg)))


# ---------------------------------------------------------------------------------------------------------
# PRO / AU-PRO


def _label_regions(masks_b: np.ndarray) -> tuple[np.ndarray, int]:
    """Label 8-connected GT regions per image, ids unique across images (0 = normal); return (ids, count)."""
    region_ids = np.zeros(masks_b.shape, dtype=np.int32)
    total = 0
    for i, mask in enumerate(masks_b):
        labeled, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
        if n:
            region_ids[i] = np.where(labeled > 0, labeled + total, 0)
        total += n
    return region_ids, total


def pro_curve(
    masks: Any, maps: Any, num_thresholds: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve: (fpr, pro, thresholds), thresholds descending, starting at (0, 0, +inf).

    PRO(t) = mean over all 8-connected GT regions (across images) of the fraction of region pixels with
    score >= t; FPR(t) = fraction of all normal pixels (good images included) with score >= t. Exact: one
    point per distinct score (MVTec AD reference algorithm); with `num_thresholds`, an evenly spaced grid
    from the lowest to the highest score instead.
    """
    masks_b, maps_f = _check_pixel_inputs(masks, maps)
    region_ids, num_regions = _label_regions(masks_b)
    del masks_b
    ids = region_ids.reshape(-1)
    del region_ids
    sizes = np.bincount(ids)
    num_normal = int(sizes[0])
    if num_regions == 0:
        raise ValueError("PRO needs at least one anomalous ground-truth region; all masks are empty")
    if num_normal == 0:
        raise ValueError("PRO needs normal pixels for the false positive rate; every mask pixel is anomalous")
    # Each region pixel contributes 1/size(region) to the sum over regions of the covered fraction.
    inv_size = np.zeros(sizes.size, dtype=np.float64)
    inv_size[1:] = 1.0 / sizes[1:]
    scores = maps_f.reshape(-1)

    if num_thresholds is None:
        order, sorted_scores, ends = _descending_groups(scores)
        thresholds = sorted_scores[ends].astype(np.float64)
        del sorted_scores
        sorted_ids = ids[order]
        del order
        fp = np.cumsum(sorted_ids == 0, dtype=np.int64)[ends]
        pro_sum = np.cumsum(inv_size[sorted_ids])[ends]
        del sorted_ids
    else:
        if num_thresholds < 2:
            raise ValueError(f"num_thresholds must be at least 2; got {num_thresholds}")
        grid = np.linspace(float(scores.min()), float(scores.max()), int(num_thresholds))
        # bin j = number of grid thresholds <= score: the pixel counts for thresholds grid[0..j-1].
        bins = np.searchsorted(grid, scores, side="right")
        k = grid.size
        fp_hist = np.bincount(bins[ids == 0], minlength=k + 1)
        pro_hist = np.bincount(bins, weights=inv_size[ids], minlength=k + 1)
        del bins
        # count(score >= grid[i]) = sum of hist[j] for j > i; listed for i = k-1 .. 0 (descending thresholds).
        fp = np.cumsum(fp_hist[::-1])[:k]
        pro_sum = np.cumsum(pro_hist[::-1])[:k]
        thresholds = grid[::-1].copy()

    fpr = np.minimum(fp / num_normal, 1.0)
    pro = np.minimum(pro_sum / num_regions, 1.0)  # clip float round-off of the cumulative sum
    fpr = np.concatenate(([0.0], fpr))
    pro = np.concatenate(([0.0], pro))
    thresholds = np.concatenate(([np.inf], thresholds))
    return fpr, pro, thresholds


def au_pro(masks: Any, maps: Any, fpr_limit: float = 0.3, num_thresholds: int | None = None) -> float:
    """Normalised area under the PRO-vs-FPR curve from FPR 0 to `fpr_limit` (MVTec AD AU-PRO), in [0, 1].

    The curve is integrated with trapezoids, its value at exactly `fpr_limit` interpolated, and the area
    divided by `fpr_limit`. Exact by default; `num_thresholds` uses an evenly spaced threshold grid.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1]; got {fpr_limit}")
    fpr, pro, _ = pro_curve(masks, maps, num_thresholds=num_thresholds)
    # The curve always ends at FPR 1 (lowest threshold takes every pixel), so fpr_limit lies within it.
    return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


# ---------------------------------------------------------------------------------------------------------
# image-level operating points


def _image_counts(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct score t (descending): (t, true positives, false positives) predicting score >= t."""
    order, sorted_scores, ends = _descending_groups(scores)
    tp = np.cumsum(positive[order], dtype=np.int64)[ends]
    fp = (ends + 1) - tp
    return sorted_scores[ends], tp, fp


def f1_optimal_threshold(labels: Any, scores: Any) -> dict[str, float | int]:
    """Threshold maximising image-level F1 over the precision-recall curve, with the errors it makes there.

    Candidates are the distinct scores (predict anomalous when score >= threshold). Ties in F1 go to the
    fewest misclassified images, then the higher threshold. `misclassified` = false positives + false
    negatives at that threshold (the paper's Table 1 count).
    """
    positive, scores_arr = _check_image_inputs(labels, scores)
    thresholds, tp, fp = _image_counts(positive, scores_arr)
    num_pos = int(np.count_nonzero(positive))
    fn = num_pos - tp
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)  # denominator >= num_pos > 0
    errors = fp + fn
    best_f1 = f1.max()
    candidates = np.flatnonzero(np.isclose(f1, best_f1, rtol=1e-12, atol=0.0))
    candidates = candidates[errors[candidates] == errors[candidates].min()]
    i = int(candidates[0])  # thresholds are descending: the first is the highest
    return {
        "threshold": float(thresholds[i]),
        "f1": float(f1[i]),
        "precision": float(tp[i] / (tp[i] + fp[i])),
        "recall": float(tp[i] / num_pos),
        "misclassified": int(errors[i]),
    }


def error_at_full_recall(labels: Any, scores: Any) -> dict[str, float | int]:
    """Errors when the threshold catches every anomalous image (threshold = lowest anomalous score).

    `false_positive_rate` is the fraction of nominal images flagged; `misclassified` counts them (there
    are no false negatives at full recall). Supplement B / fig. S3 of the PatchCore paper.
    """
    positive, scores_arr = _check_image_inputs(labels, scores)
    threshold = float(scores_arr[positive].min())
    false_pos = int(np.count_nonzero(scores_arr[~positive] >= threshold))
    return {
        "threshold": threshold,
        "false_positive_rate": false_pos / int(np.count_nonzero(~positive)),
        "misclassified": false_pos,
    }


def compute_metrics(labels: Any, scores: Any, masks: Any = None, maps: Any = None,
                    calibration: dict[str, Any] | None = None) -> dict[str, Any]:
    """All evaluation numbers of one test split as a JSON-serialisable dict of plain floats/ints.

    Keys: image_auroc, pixel_auroc, au_pro, f1_threshold, f1, misclassified, error_at_full_recall (the
    nominal false positive rate at 100% recall). pixel_auroc and au_pro are None without masks and maps.
    The F1-optimal figures are an ORACLE (`f1_is_oracle`): their threshold is chosen with the test labels.
    With the model's `calibration` (thresholds set on held-out nominal train images), `operating_point` holds
    what a line operator gets: FPR, TPR and precision at the calibrated threshold (pixel FPR/TPR too).
    """
    f1_point = f1_optimal_threshold(labels, scores)
    full_recall = error_at_full_recall(labels, scores)
    result: dict[str, Any] = {
        "image_auroc": image_auroc(labels, scores),
        "pixel_auroc": None,
        "au_pro": None,
        "f1_threshold": f1_point["threshold"],
        "f1": f1_point["f1"],
        "misclassified": f1_point["misclassified"],
        "error_at_full_recall": full_recall["false_positive_rate"],
        "f1_is_oracle": True,
        "operating_point": None,
    }
    if (masks is None) != (maps is None):
        raise ValueError("pass both masks and maps for pixel metrics, or neither")
    if masks is not None:
        result["pixel_auroc"] = pixel_auroc(masks, maps)
        result["au_pro"] = au_pro(masks, maps)
    if calibration:
        from patchcore_core.calibration import operating_point

        result["operating_point"] = operating_point(labels, scores, calibration["threshold"], masks, maps,
                                                    calibration.get("pixel_threshold"),
                                                    calibration.get("target_fpr"))
    return result


# ---------------------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects directly: no pyplot, no change to the global backend)


def _save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Render `fig` to PNG at `path` atomically and return the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def plot_roc_pr(labels: Any, scores: Any, path: str | os.PathLike, title: str = "") -> Path:
    """Write one PNG with the image-level ROC curve (left) and precision-recall curve (right)."""
    from matplotlib.figure import Figure

    positive, scores_arr = _check_image_inputs(labels, scores)
    fpr, tpr, _ = roc_curve(positive, scores_arr)
    precision, recall, _ = precision_recall_curve(positive, scores_arr)
    f1_point = f1_optimal_threshold(positive.astype(int), scores_arr)

    fig = Figure(figsize=(10, 4.5))
    ax_roc, ax_pr = fig.subplots(1, 2)
    ax_roc.plot(fpr, tpr, lw=2, label=f"AUROC = {image_auroc(positive.astype(int), scores_arr):.4f}")
    ax_roc.plot([0, 1], [0, 1], ls="--", lw=1, color="grey")
    ax_roc.set(
        xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02)
    )
    ax_roc.legend(loc="lower right")
    ax_pr.plot(recall, precision, lw=2, drawstyle="steps-post")
    ax_pr.plot(
        [f1_point["recall"]],
        [f1_point["precision"]],
        "o",
        label=f"best F1 = {f1_point['f1']:.4f} (t = {f1_point['threshold']:.4g})",
    )
    ax_pr.axhline(positive.mean(), ls="--", lw=1, color="grey")
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.legend(loc="lower left")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_pro_curve(
    masks: Any, maps: Any, path: str | os.PathLike, fpr_limit: float = 0.3, title: str = ""
) -> Path:
    """Write a PNG of the PRO-vs-FPR curve with the AU-PRO integration limit drawn."""
    from matplotlib.figure import Figure

    fpr, pro, _ = pro_curve(masks, maps)
    score = _area_up_to(fpr, pro, fpr_limit) / fpr_limit
    if fpr.size > 5000:  # an exact curve has one point per distinct pixel score: thin it for drawing
        keep = np.unique(np.linspace(0, fpr.size - 1, 5000).round().astype(np.int64))
        fpr, pro = fpr[keep], pro[keep]

    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    ax.plot(fpr, pro, lw=2, label=f"AU-PRO@{fpr_limit:g} = {score:.4f}")
    ax.axvline(fpr_limit, ls="--", lw=1, color="grey")
    ax.set(
        xlabel="false positive rate (normal pixels)", ylabel="per-region overlap", xlim=(0, 1), ylim=(0, 1.02)
    )
    ax.set_title(title or "PRO curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return _save_figure(fig, path)
