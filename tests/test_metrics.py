"""Metrics on small hand-computed cases, plus AU-PRO against a brute-force threshold sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from patchcore_core.metrics import (
    au_pro,
    compute_metrics,
    error_at_full_recall,
    f1_optimal_threshold,
    image_auroc,
    pixel_auroc,
    plot_pro_curve,
    plot_roc_pr,
    pro_curve,
)

# ------------------------------------------------------------------------------------------------ image AUROC


def test_image_auroc_perfect_inverted_and_ties():
    labels = [0, 0, 1, 1]
    assert image_auroc(labels, [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert image_auroc(labels, [0.9, 0.8, 0.2, 0.1]) == 0.0
    assert image_auroc(labels, [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_image_auroc_needs_both_classes():
    with pytest.raises(ValueError, match="both nominal"):
        image_auroc([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0"):
        image_auroc([0, 2], [0.1, 0.2])


# ------------------------------------------------------------------------------------------------ pixel AUROC


def test_pixel_auroc_hand_case_with_a_tie():
    # Anomalous pixels score 0.9 and 0.4; normal pixels 0.5, 0.1, 0.4, 0.0 (P = 2, N = 4 -> 8 pairs).
    # 0.9 beats all 4 normals -> 4; 0.4 beats 0.1 and 0.0, ties 0.4 (1/2), loses to 0.5 -> 2.5.
    # AUROC = 6.5 / 8 = 0.8125.
    masks = np.array([[[1, 0, 0]], [[1, 0, 0]]], dtype=np.uint8)
    maps = np.array([[[0.9, 0.5, 0.1]], [[0.4, 0.4, 0.0]]], dtype=np.float32)
    assert pixel_auroc(masks, maps) == pytest.approx(0.8125, abs=1e-12)


def test_pixel_auroc_matches_sklearn_on_random_maps_with_ties():
    rng = np.random.default_rng(0)
    masks = (rng.random((4, 16, 16)) < 0.2).astype(np.uint8)
    maps = np.round(rng.random((4, 16, 16)) + 0.5 * masks, 1).astype(np.float32)  # many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_needs_both_pixel_classes():
    with pytest.raises(ValueError, match="both anomalous and normal"):
        pixel_auroc(np.zeros((1, 2, 2), np.uint8), np.zeros((1, 2, 2), np.float32))


# ------------------------------------------------------------------------------------------------ AU-PRO


def test_au_pro_map_equal_to_mask_is_one():
    masks = np.zeros((2, 6, 6), dtype=np.uint8)
    masks[0, 1:3, 1:4] = 1
    masks[0, 5, 5] = 1
    maps = masks.astype(np.float32)
    # Curve (0,0) -> (0,1) -> (1,1): PRO = 1 for every FPR > 0.
    assert au_pro(masks, maps) == 1.0


def test_au_pro_half_covered_region_hand_value():
    # One 2x7 image. Region A = (0,0),(0,1); region B = (0,4),(0,5) (not 8-connected to A).
    # 10 normal pixels. A fully scored 1.0, B half (only (0,4)); one normal pixel scores 0.5, rest 0.
    mask = np.array([[1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0]], dtype=np.uint8)
    amap = np.array([[1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0.5]], dtype=np.float64)
    # Thresholds (descending): t=1   -> FPR 0,    PRO (1 + 1/2)/2 = 3/4
    #                          t=0.5 -> FPR 1/10, PRO 3/4
    #                          t=0   -> FPR 1,    PRO 1
    # Area up to FPR 0.3: [0, 0.1] at 3/4 -> 0.075.
    # On (0.1, 3/4)-(1, 1): PRO(0.3) = 3/4 + (1/4)(0.2/0.9) = 3/4 + 1/18 = 29/36,
    #   trapezoid 0.2 * (27/36 + 29/36) / 2 = 5.6/36.
    # Total 0.075 + 5.6/36 = 8.3/36; divided by 0.3 -> 83/108 = 0.76851...
    fpr, pro, thr = pro_curve(mask[None], amap[None])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.1, 1.0])
    np.testing.assert_allclose(pro, [0.0, 0.75, 0.75, 1.0])
    np.testing.assert_array_equal(thr, [np.inf, 1.0, 0.5, 0.0])
    assert au_pro(mask, amap) == pytest.approx(83 / 108, abs=1e-12)


def test_au_pro_regions_weigh_equally_whatever_their_size():
    # Region A = 1 pixel at (0,0); region B = 3x3 block at rows/cols 2..4 (9 pixels); 25 normal pixels.
    masks = np.zeros((1, 5, 7), dtype=np.uint8)
    masks[0, 0, 0] = 1
    masks[0, 2:5, 2:5] = 1
    only_small = np.zeros((1, 5, 7), dtype=np.float32)
    only_small[0, 0, 0] = 1.0
    only_large = np.zeros((1, 5, 7), dtype=np.float32)
    only_large[0, 2:5, 2:5] = 1.0
    # Either way the curve is (0,0) -> (0,1/2) -> (1,1): PRO(0.3) = 0.5 + 0.5*0.3 = 0.65,
    # area = 0.3 * (0.5 + 0.65) / 2 = 0.1725, AU-PRO = 0.575. (Pixel-weighted overlap would give PRO 0.1
    # for the small region and 0.9 for the large one.)
    assert au_pro(masks, only_small) == pytest.approx(0.575, abs=1e-12)
    assert au_pro(masks, only_large) == pytest.approx(0.575, abs=1e-12)


def test_au_pro_uses_eight_connectivity():
    # (0,0) and (1,1) touch diagonally: one region under 8-connectivity; (3,3) is a second region.
    masks = np.zeros((1, 4, 4), dtype=np.uint8)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 3, 3] = 1
    maps = np.zeros((1, 4, 4), dtype=np.float32)
    maps[0, 0, 0] = maps[0, 1, 1] = 1.0
    # 8-connectivity: PRO at t=1 is (1 + 0)/2 = 1/2 -> AU-PRO 0.575 (as above).
    # 4-connectivity would give three regions, PRO 2/3 and AU-PRO 0.71666...
    _, pro, _ = pro_curve(masks, maps)
    assert pro[1] == 0.5
    assert au_pro(masks, maps) == pytest.approx(0.575, abs=1e-12)


def test_au_pro_fpr_counts_normal_pixels_of_good_images():
    # Image 0: 3x3, region = centre pixel scored 1, its 8 normal pixels 0.
    # Image 1: good 3x3 image with one pixel scored 1. Normal pixels in all: 8 + 9 = 17.
    masks = np.zeros((2, 3, 3), dtype=np.uint8)
    masks[0, 1, 1] = 1
    maps = np.zeros((2, 3, 3), dtype=np.float32)
    maps[0, 1, 1] = 1.0
    maps[1, 0, 0] = 1.0
    # Curve (0,0) -> (1/17, 1) -> (1, 1). Area to 0.3 = (1/17)/2 + (0.3 - 1/17) = 0.3 - 1/34;
    # AU-PRO = 1 - 1/(34*0.3) = 1 - 5/51 = 46/51. Without the good image it would be 1.0.
    assert au_pro(masks, maps) == pytest.approx(46 / 51, abs=1e-12)
    assert au_pro(masks[:1], maps[:1]) == 1.0


def test_au_pro_rejects_missing_regions_or_normals():
    with pytest.raises(ValueError, match="anomalous ground-truth region"):
        au_pro(np.zeros((1, 3, 3), np.uint8), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="normal pixels"):
        au_pro(np.ones((1, 3, 3), np.uint8), np.zeros((1, 3, 3)))
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro(np.eye(3, dtype=np.uint8), np.eye(3), fpr_limit=0.0)


def _brute_force_au_pro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """Independent AU-PRO: sweep every distinct score, recompute PRO and FPR from scratch each time."""
    regions = []
    for i, mask in enumerate(masks):
        labeled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labeled == r) for r in range(1, n + 1)]
    normal = masks == 0
    points = [(0.0, 0.0)]
    for t in sorted(np.unique(maps), reverse=True):
        above = maps >= t
        fpr = above[normal].sum() / normal.sum()
        pro = np.mean([above[i][region].mean() for i, region in regions])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:], strict=True):
        if x0 >= limit:
            break
        if x1 <= limit:
            area += (x1 - x0) * (y0 + y1) / 2
        else:
            y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            area += (limit - x0) * (y0 + y_at) / 2
            break
    return area / limit


@pytest.mark.parametrize("seed", range(5))
def test_au_pro_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    masks = (rng.random((3, 9, 9)) < 0.25).astype(np.uint8)  # many small, diagonally touching regions
    masks[2] = 0  # one good image
    maps = np.round(rng.random((3, 9, 9)) + 0.4 * masks, 2)  # ties included
    for limit in (0.3, 0.05, 1.0):
        assert au_pro(masks, maps, fpr_limit=limit) == pytest.approx(
            _brute_force_au_pro(masks, maps, limit), abs=1e-6
        )


def test_au_pro_threshold_grid():
    rng = np.random.default_rng(1)
    masks = (rng.random((2, 8, 8)) < 0.3).astype(np.uint8)
    # Scores on {0, 0.5, 1}: the 3-point grid contains every distinct score, so it equals the exact value.
    maps = rng.integers(0, 3, size=(2, 8, 8)) / 2.0
    assert au_pro(masks, maps, num_thresholds=3) == pytest.approx(au_pro(masks, maps), abs=1e-12)
    # Continuous scores: a fine grid approaches the exact value.
    maps = rng.random((2, 8, 8)) + 0.3 * masks
    assert au_pro(masks, maps, num_thresholds=20001) == pytest.approx(au_pro(masks, maps), abs=1e-3)


# ----------------------------------------------------------------------------------------- operating points

LABELS = [0, 0, 0, 1, 1, 1]
SCORES = [0.1, 0.4, 0.6, 0.35, 0.8, 0.9]
# Predict anomalous when score >= t (3 anomalous images):
#   t=0.9 : TP 1 FP 0 FN 2 -> F1 2/4 = 0.5
#   t=0.8 : TP 2 FP 0 FN 1 -> F1 4/5 = 0.8   <- best; misclassified 1
#   t=0.6 : TP 2 FP 1 FN 1 -> F1 4/6
#   t=0.4 : TP 2 FP 2 FN 1 -> F1 4/7
#   t=0.35: TP 3 FP 2 FN 0 -> F1 6/8
#   t=0.1 : TP 3 FP 3 FN 0 -> F1 6/9


def test_f1_optimal_threshold_hand_case():
    result = f1_optimal_threshold(LABELS, SCORES)
    assert result == {"threshold": 0.8, "f1": 0.8, "precision": 1.0, "recall": 2 / 3, "misclassified": 1}


def test_error_at_full_recall_hand_case():
    # Lowest anomalous score 0.35 flags nominal 0.4 and 0.6: 2 of 3 nominal images.
    result = error_at_full_recall(LABELS, SCORES)
    assert result == {"threshold": 0.35, "false_positive_rate": 2 / 3, "misclassified": 2}


def test_compute_metrics_is_json_ready():
    without_pixels = compute_metrics(LABELS, np.array(SCORES, dtype=np.float32))
    assert without_pixels["pixel_auroc"] is None and without_pixels["au_pro"] is None
    assert without_pixels["image_auroc"] == pytest.approx(7 / 9)  # 2 of 9 pairs inverted: 0.35 < 0.4, 0.6
    assert without_pixels["misclassified"] == 1
    assert without_pixels["error_at_full_recall"] == pytest.approx(2 / 3)

    masks = np.zeros((6, 3, 3), dtype=np.uint8)
    masks[3:, 1, 1] = 1
    maps = masks.astype(np.float32)
    result = compute_metrics(np.array(LABELS), SCORES, masks, maps)
    assert set(result) == {
        "image_auroc",
        "pixel_auroc",
        "au_pro",
        "f1_threshold",
        "f1",
        "misclassified",
        "error_at_full_recall",
        "f1_is_oracle",
        "operating_point",
    }
    assert result["pixel_auroc"] == 1.0 and result["au_pro"] == 1.0 and result["f1_is_oracle"] is True
    assert result["operating_point"] is None  # no calibration given: no operating point to report
    assert all(type(v) in (float, int) for k, v in result.items() if k not in ("f1_is_oracle", "operating_point"))
    json.dumps(result)
    calibration = {"threshold": 0.5, "pixel_threshold": 0.5}
    calibrated = compute_metrics(np.array(LABELS), SCORES, masks, maps, calibration=calibration)
    json.dumps(calibrated)
    assert calibrated["operating_point"]["threshold"] == 0.5 and calibrated["operating_point"]["pixel_tpr"] == 1.0


# ------------------------------------------------------------------------------------------------ figures


def test_plot_roc_pr_writes_png(tmp_path):
    out = plot_roc_pr(LABELS, SCORES, tmp_path / "sub" / "roc_pr.png", title="toy")
    assert out == tmp_path / "sub" / "roc_pr.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in out.parent.iterdir()] == ["roc_pr.png"]  # no temporary left behind


def test_plot_pro_curve_writes_png(tmp_path):
    masks = np.zeros((2, 6, 6), dtype=np.uint8)
    masks[0, 2:4, 2:4] = 1
    maps = np.random.default_rng(0).random((2, 6, 6)) + masks
    out = plot_pro_curve(masks, maps, tmp_path / "pro.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
