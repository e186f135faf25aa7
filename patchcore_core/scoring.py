"""From nearest-neighbour distances to image scores and segmentation maps."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter


def patch_scores(sq_distances: np.ndarray, distance: str = "l2") -> np.ndarray:
    """Mean distance to the k nearest memory patches ([M, k] squared L2 in, [M] out); k = 1 is the paper's."""
    if distance not in ("l2", "squared_l2"):
        raise ValueError(f"distance must be 'l2' or 'squared_l2', got {distance!r}")
    d = np.maximum(sq_distances, 0.0)
    if distance == "l2":
        d = np.sqrt(d)
    return d.mean(axis=1).astype(np.float32)


def reweight_weights(test_to_support: np.ndarray) -> np.ndarray:
    """Paper eq. 7: 1 − exp(d(m_test*, m*)) / Σ_{m ∈ N_b(m*)} exp(d(m_test*, m)), per image.

    `test_to_support`: [B, b] distances from each image's most anomalous patch to the b nearest bank
    neighbours of its nearest bank patch m*, with m* itself first. Computed as a stable softmax.
    """
    logits = test_to_support - test_to_support.max(axis=1, keepdims=True)
    soft = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return (1.0 - soft[:, 0]).astype(np.float32)


def anomaly_maps(scores: np.ndarray, out_size: int | tuple[int, int], sigma: float = 4.0) -> np.ndarray:
    """Patch score grids [B, h, w] → bilinear upsampling to the input size → Gaussian blur (σ = 4)."""
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    grid = torch.from_numpy(np.ascontiguousarray(scores, dtype=np.float32)).unsqueeze(1)
    up = F.interpolate(grid, size=size, mode="bilinear", align_corners=False).squeeze(1).numpy()
    if sigma > 0:
        up = gaussian_filter(up, sigma=(0, sigma, sigma), truncate=4.0)
    return up.astype(np.float32, copy=False)


def score_stream(
    batches: Iterable[tuple[np.ndarray | None, Any]],
    score_batch: Callable[[Any], tuple[np.ndarray, np.ndarray]],
    n_images: int,
    image_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The one scoring loop: (image scores [N], anomaly maps [N, S, S]) from `score_batch` over batches.

    Each batch is (image positions [b] or None for "next in order", the batch input: images or patch features).
    Results are written into preallocated arrays, so peak memory is the output plus one batch.
    """
    scores = np.empty(n_images, np.float32)
    maps = np.empty((n_images, image_size, image_size), np.float32)
    row = 0
    for positions, batch in batches:
        batch_scores, batch_maps = score_batch(batch)
        where = np.arange(row, row + len(batch_scores)) if positions is None else positions
        scores[where] = batch_scores
        maps[where] = batch_maps
        row += len(batch_scores)
    if row != n_images:
        raise ValueError(f"scored {row} images, expected {n_images}")
    return scores, maps
