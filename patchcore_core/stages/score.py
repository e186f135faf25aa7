"""Stage 5, score: image scores and anomaly maps of the test split, from the test shards, plus the one writer of
score artifacts (predictions.parquet, anomaly_maps.npy, gt_masks.npy) that every detector's evaluation uses."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel

from patchcore_core import shards as shard_io
from patchcore_core.artifacts import (
    MAPS_FILE,
    MASKS_FILE,
    MODEL_FILES,
    PREDICTIONS_FILE,
    StageDir,
    atomic_write,
    file_digest,
    fingerprint,
)
from patchcore_core.data import CategoryListing, list_category, load_masks
from patchcore_core.errors import DataError
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime, configure_threads
from patchcore_core.scoring import score_stream
from patchcore_core.stages.extract import SplitFeatures, relpath
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult

__all__ = ["ScoreResult", "run", "write_scores", "PREDICTION_COLUMNS"]

# The one column schema of predictions.parquet, in test-listing order.
PREDICTION_COLUMNS = ("image_index", "path", "relpath", "label", "defect_type", "score")


class ScoreResult(BaseModel):
    """Test-split scores: predictions.parquet, anomaly_maps.npy, gt_masks.npy (test-listing order)."""

    directory: str
    category: str
    predictions: str
    maps: str
    masks: str
    n_images: int
    fingerprint: str
    seconds_per_image: float = 0.0


def write_scores(out_dir: str | os.PathLike, listing: CategoryListing, scores: np.ndarray, maps: np.ndarray,
                 masks: np.ndarray) -> dict[str, Path]:
    """Write predictions.parquet (`PREDICTION_COLUMNS`), anomaly_maps.npy and gt_masks.npy, each atomically."""
    out = Path(out_dir)
    n = len(listing.test)
    table = pd.DataFrame({
        "image_index": np.arange(n, dtype=np.int32),
        "path": [s.path for s in listing.test],
        "relpath": [relpath(listing, s.path) for s in listing.test],
        "label": np.array([s.label for s in listing.test], np.int8),
        "defect_type": [s.defect_type for s in listing.test],
        "score": np.asarray(scores, np.float32),
    }, columns=list(PREDICTION_COLUMNS))
    with atomic_write(out / PREDICTIONS_FILE) as tmp:
        table.to_parquet(tmp, index=False)
    for name, array in ((MAPS_FILE, maps.astype(np.float32)), (MASKS_FILE, masks.astype(np.uint8))):
        with atomic_write(out / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return {"predictions": out / PREDICTIONS_FILE, "maps": out / MAPS_FILE, "masks": out / MASKS_FILE}


def finish_scores(out: StageDir, listing: CategoryListing, scores: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray, seconds: float) -> ScoreResult:
    """Write the score artifacts into a stage folder and mark it complete."""
    paths = write_scores(out.path, listing, scores, maps, masks)
    n = len(listing.test)
    result = ScoreResult(directory=str(out.path), category=listing.category, n_images=n,
                         fingerprint=out.fingerprint, seconds_per_image=round(seconds / max(1, n), 6),
                         **{k: str(v) for k, v in paths.items()})
    out.finish(result.model_dump(), outputs=paths.values())
    return result


def run(model: ModelResult, test: SplitFeatures, fetched: FetchResult, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME) -> ScoreResult:
    """Score the test shards with a saved model: exactly what `PatchCore.predict` gives on the same images."""
    from patchcore_core.model import PatchCore

    model_dir = Path(model.model_dir)
    out = StageDir.of(Path(work_dir) / "stages", test.category, "score",
                      fingerprint("score", file_digest(model_dir / f for f in MODEL_FILES), test.fingerprint))
    if (done := out.finished()) is not None:
        return ScoreResult(**done)
    detector = PatchCore.load(model_dir, device=None if runtime.device == "auto" else runtime.device)
    if runtime.num_threads is not None:
        configure_threads(runtime.num_threads)
    if tuple(detector.feature_grid_) != tuple(test.grid):
        raise ValueError(f"model grid {detector.feature_grid_} differs from the test features' grid {test.grid}")
    listing = list_category(fetched.root, test.category)
    if len(listing.test) != test.n_images:
        raise DataError(f"{fetched.root}/{test.category}: {len(listing.test)} test images, shards hold "
                        f"{test.n_images}")
    start = time.perf_counter()
    scores, maps = score_stream(shard_io.iter_image_batches(test.shards), detector.score_patch_features,
                                test.n_images, detector.image_size)
    elapsed = time.perf_counter() - start
    masks = load_masks(listing.test, detector.resize, detector.image_size)
    return finish_scores(out, listing, scores, maps, masks, elapsed)
