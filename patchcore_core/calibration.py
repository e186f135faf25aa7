"""Decision thresholds that never see the test set: nominal train images are held out, scored against a bank
built without them, and the thresholds are set at a target nominal false-positive rate.

The same held-out choice and the same threshold rule serve `PatchCore.fit` and the pipeline's calibrate stage,
so both give the same thresholds. The final memory bank still keeps every train image: the held-out images
only calibrate (their scores against the smaller bank are, if anything, slightly pessimistic, so the nominal
false-positive rate of the final model is at most the target's, up to sampling error).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["holdout_images", "thresholds", "operating_point", "fpr_within_target"]

QUANTILES = (0.5, 0.9, 0.95, 0.99, 1.0)


def holdout_images(n_images: int, fraction: float, min_images: int, seed: int) -> np.ndarray:
    """Sorted indices of the train images held out for calibration (empty when calibration is off).

    max(min_images, ceil(fraction * n)) images, but never more than half of them, so the calibration bank
    keeps at least as many images as are scored against it. A seeded draw: the same for the estimator and
    the pipeline.
    """
    if fraction <= 0 or n_images < 2:
        return np.zeros(0, dtype=np.int64)
    k = min(max(int(min_images), math.ceil(fraction * n_images)), n_images // 2)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xCA11B]))
    return np.sort(rng.choice(n_images, size=k, replace=False)).astype(np.int64)


def thresholds(scores: np.ndarray, maps: np.ndarray, target_fpr: float, target_pixel_fpr: float,
               n_bank_images: int) -> dict[str, Any]:
    """Image and pixel thresholds at the target nominal false-positive rates, from held-out nominal scores
    [n] and maps [n, S, S], with what a reviewer needs to judge them (method, n, quantiles)."""
    scores = np.asarray(scores, dtype=np.float64)
    pixels = np.asarray(maps, dtype=np.float32).reshape(-1)
    return {
        "method": "holdout",
        "n_holdout_images": int(len(scores)),
        "n_bank_images": int(n_bank_images),
        "target_fpr": float(target_fpr),
        "target_pixel_fpr": float(target_pixel_fpr),
        "threshold": float(np.quantile(scores, 1.0 - target_fpr)),
        "pixel_threshold": float(np.quantile(pixels, 1.0 - target_pixel_fpr)),
        "score_quantiles": {f"q{int(q * 100)}": float(np.quantile(scores, q)) for q in QUANTILES},
        "pixel_quantiles": {f"q{int(q * 100)}": float(np.quantile(pixels, q)) for q in QUANTILES},
    }


def operating_point(labels: np.ndarray, scores: np.ndarray, threshold: float | None,
                    masks: np.ndarray | None = None, maps: np.ndarray | None = None,
                    pixel_threshold: float | None = None, target_fpr: float | None = None) -> dict[str, Any] | None:
    """FPR, TPR and precision of `score >= threshold` on a labelled set, with the counts behind them and the
    target FPR the threshold was set for (and the pixel-level FPR / TPR of `map >= pixel_threshold` when masks
    and a pixel threshold are given); None without a threshold."""
    if threshold is None:
        return None
    labels = np.asarray(labels).astype(bool)
    flagged = np.asarray(scores) >= threshold
    tp, fp = int((flagged & labels).sum()), int((flagged & ~labels).sum())
    out: dict[str, Any] = {
        "threshold": float(threshold),
        "fpr": fp / max(1, int((~labels).sum())),
        "tpr": tp / max(1, int(labels.sum())),
        "precision": tp / max(1, tp + fp) if tp + fp else None,
        "n_flagged": int(flagged.sum()),
        "n_nominal": int((~labels).sum()),
        "n_false_positives": fp,
        "target_fpr": None if target_fpr is None else float(target_fpr),
    }
    if pixel_threshold is not None and masks is not None and maps is not None:
        truth = np.asarray(masks).astype(bool)
        predicted = np.asarray(maps) >= pixel_threshold
        out["pixel_threshold"] = float(pixel_threshold)
        out["pixel_fpr"] = float((predicted & ~truth).sum() / max(1, (~truth).sum()))
        out["pixel_tpr"] = float((predicted & truth).sum() / max(1, truth.sum()))
    return out


def fpr_within_target(op: dict[str, Any] | None, alpha: float = 0.05) -> tuple[bool, str]:
    """Whether a model's false positives at its calibrated threshold on a labelled (canary) set are within its
    target rate: not significantly more than Binomial(n_nominal, target_fpr) gives (one-sided test at `alpha`),
    so a small canary set's noise does not block a good model while a model that flags far too many does not
    pass. (False, why) without an operating point."""
    from scipy.stats import binom

    if not op or op.get("target_fpr") is None:
        return False, "no calibrated threshold: its false-positive rate cannot be checked"
    n, fp, target = int(op["n_nominal"]), int(op["n_false_positives"]), float(op["target_fpr"])
    p_value = float(binom.sf(fp - 1, n, target)) if fp > 0 else 1.0
    ok = p_value >= alpha
    return ok, (f"canary FPR {fp}/{n} = {fp / max(1, n):.3f} at its calibrated threshold "
                f"{'within' if ok else 'above'} the target {target:g} (binomial p = {p_value:.3f})")
