"""Scoring: distances, eq. 7 weights, segmentation maps."""

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from patchcore_core.scoring import anomaly_maps, patch_scores, reweight_weights


def test_patch_scores_l2_and_squared():
    sq = np.array([[4.0, 16.0], [9.0, 9.0]], dtype=np.float32)
    np.testing.assert_allclose(patch_scores(sq, "l2"), [3.0, 3.0])
    np.testing.assert_allclose(patch_scores(sq[:, :1], "squared_l2"), [4.0, 9.0])
    with pytest.raises(ValueError, match="distance"):
        patch_scores(sq, "cosine")


def test_reweight_weights_hand_case():
    # d(m_test*, m*) = 1, two other support points at distance 1 → softmax share 1/3 → weight 2/3.
    np.testing.assert_allclose(reweight_weights(np.array([[1.0, 1.0, 1.0]])), [2 / 3], rtol=1e-6)
    # A test patch far from m*'s neighbourhood but near m*: m* dominates less → weight closer to 1.
    w = reweight_weights(np.array([[1.0, 5.0, 5.0], [5.0, 1.0, 1.0]]))
    assert w[0] > 0.95 and w[1] < 0.05
    # Large distances do not overflow.
    assert np.isfinite(reweight_weights(np.array([[900.0, 1000.0]]))).all()


def test_anomaly_maps_upsample_and_blur():
    grid = np.zeros((2, 4, 4), dtype=np.float32)
    grid[0, 1, 2] = 1.0
    maps = anomaly_maps(grid, 32, sigma=4)
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32
    assert np.all(maps[1] == 0)
    peak = np.unravel_index(maps[0].argmax(), maps[0].shape)
    assert 8 <= peak[0] <= 15 and 16 <= peak[1] <= 23  # the cell (1, 2) of a 4×4 grid on 32×32
    unblurred = anomaly_maps(grid, 32, sigma=0)
    np.testing.assert_allclose(maps[0], gaussian_filter(unblurred[0], 4, truncate=4.0), atol=1e-6)
