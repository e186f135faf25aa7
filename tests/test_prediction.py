"""Production predictions: maps placed back at the input resolution exactly where the model looked,
unique output names, and the calibration rules."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from patchcore_core.calibration import holdout_images, operating_point, thresholds
from patchcore_core.prediction import input_geometry, output_names, to_input_resolution


@pytest.mark.parametrize(("size", "resize", "crop"), [((100, 60), 48, 40), ((60, 100), 48, 40), ((513, 512), 256, 224),
                                                      ((300, 300), None, 224), ((97, 211), 80, 79)])
def test_geometry_matches_torchvision_resize_and_centre_crop(size, resize, crop):
    (h, w), (top, left) = input_geometry(size, resize, crop)
    img = Image.new("L", size)
    resized = TF.resize(img, [resize]) if resize else img
    assert resized.size == (w, h)
    # A frame whose pixels encode their own column and row: the crop's first pixel says where the crop starts.
    cols = np.tile(np.arange(w, dtype=np.int32), (h, 1))
    rows = np.tile(np.arange(h, dtype=np.int32)[:, None], (1, w))
    crop_cols = TF.center_crop(Image.fromarray(cols, "I"), [crop, crop])
    crop_rows = TF.center_crop(Image.fromarray(rows, "I"), [crop, crop])
    assert (np.asarray(crop_rows)[0, 0], np.asarray(crop_cols)[0, 0]) == (top, left)


def test_map_goes_back_where_the_crop_came_from():
    full = to_input_resolution(np.ones((40, 40), np.float32), (100, 60), 48, 40)
    assert full.shape == (60, 100)
    # resized 80x48, crop rows 4..44 and columns 20..60, i.e. rows 5..55 and columns 25..75 of the input
    assert np.allclose(full[7:53, 27:73], 1.0) and np.allclose(full[:4], 0) and np.allclose(full[:, :23], 0)
    assert np.allclose(full[57:], 0) and np.allclose(full[:, 77:], 0)


def test_output_names_are_unique_and_safe():
    assert output_names(["a/x.png", "b/x.png", "c/x.jpg", "d/tab\tname.png"]) == ["x", "x-1", "x-2", "tab_name"]


def test_holdout_is_seeded_bounded_and_off_when_asked():
    a = holdout_images(200, 0.1, 5, seed=0)
    assert len(a) == 20 and np.array_equal(a, holdout_images(200, 0.1, 5, seed=0)) and (np.diff(a) > 0).all()
    assert not np.array_equal(a, holdout_images(200, 0.1, 5, seed=1))
    assert len(holdout_images(30, 0.1, 5, seed=0)) == 5  # at least min_images
    assert len(holdout_images(8, 0.1, 5, seed=0)) == 4  # never more than half
    assert len(holdout_images(200, 0.0, 5, seed=0)) == 0 and len(holdout_images(1, 0.1, 5, seed=0)) == 0


def test_threshold_meets_the_target_rate_on_fresh_nominal_data():
    """Set on one nominal sample, the threshold's false-positive rate on another is near the target."""
    rng = np.random.default_rng(0)
    cal = thresholds(rng.gamma(4.0, 1.0, 2000), rng.random((20, 8, 8)), 0.05, 0.01, 100)
    fresh = rng.gamma(4.0, 1.0, 20000)
    assert abs((fresh >= cal["threshold"]).mean() - 0.05) < 0.01
    assert cal["n_holdout_images"] == 2000 and cal["score_quantiles"]["q95"] == pytest.approx(cal["threshold"])


def test_operating_point_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.4])
    op = operating_point(labels, scores, 0.5)
    assert op["fpr"] == 0.25 and op["tpr"] == 0.5 and op["precision"] == 0.5 and op["n_flagged"] == 2
    assert operating_point(labels, scores, None) is None
