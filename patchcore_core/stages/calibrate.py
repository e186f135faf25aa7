"""Stage 3b, calibrate: decision thresholds from held-out nominal train images, never from test images.

The held-out images (`calibration.holdout_images`, the same seeded choice as `PatchCore.fit`) are left out of a
calibration coreset built from the train shards; they are scored against it, and the image and pixel
thresholds are set at the target nominal false-positive rates. The result goes into the model folder (index
stage), so the registered model carries its operating point.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel

from patchcore_core import shards as shard_io
from patchcore_core.artifacts import StageDir, atomic_write, fingerprint
from patchcore_core.calibration import holdout_images, thresholds
from patchcore_core.config import DetectorParams
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime
from patchcore_core.scoring import score_stream
from patchcore_core.stages.coreset import select_from_shards
from patchcore_core.stages.extract import SplitFeatures

__all__ = ["CalibrationResult", "run"]

CALIBRATION_FILE = "calibration.json"


class CalibrationResult(BaseModel):
    """The thresholds and how they were set (`calibration` is None when calibration is off)."""

    category: str
    path: str
    calibration: dict[str, Any] | None
    fingerprint: str


def run(train: SplitFeatures, params: DetectorParams, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME) -> CalibrationResult:
    """Hold out train images, build a coreset without them, score them, set the thresholds."""
    from patchcore_core.baselines import make_detector

    out = StageDir.of(Path(work_dir) / "stages", train.category, "calibrate",
                      fingerprint("calibrate", params.stage_params("coreset", "model", "calibration"),
                                  train.fingerprint))
    if (done := out.finished()) is not None:
        return CalibrationResult(**done)
    held = holdout_images(train.n_images, params.calibration_fraction, params.calibration_min_images, params.seed)
    calibration = None
    if len(held):
        coreset_config = params.stage_params("coreset")
        _, bank, _ = select_from_shards(train.shards, coreset_config, device=runtime.device,
                                        num_threads=runtime.num_threads, exclude_images=held)
        model = make_detector("patchcore", strict=False, **params.estimator_params(), **runtime.estimator_kwargs())
        model.fit_memory_bank(bank, tuple(train.grid), (train.n_images - len(held)) * train.patches_per_image)
        batches = ((np.searchsorted(held, images), feats)
                   for images, feats in _held_batches(train.shards, held))
        scores, maps = score_stream(batches, model.score_patch_features, len(held), params.image_size)
        calibration = thresholds(scores, maps, params.target_fpr, params.target_pixel_fpr,
                                 train.n_images - len(held))
        runtime.say(f"{train.category}: calibrated on {len(held)} held-out train images: image threshold "
                    f"{calibration['threshold']:.4f} at nominal FPR {params.target_fpr:g}")
    with atomic_write(out / CALIBRATION_FILE) as tmp:
        tmp.write_text(json.dumps(calibration, indent=2))
    result = CalibrationResult(category=train.category, path=str(out / CALIBRATION_FILE), calibration=calibration,
                               fingerprint=out.fingerprint)
    out.finish(result.model_dump(), outputs=[result.path])
    return result


def _held_batches(shards, held: np.ndarray):
    """(image indices, features [b, h*w, D]) of the held-out images only, one row group at a time."""
    for images, feats in shard_io.iter_image_batches(shards):
        keep = np.isin(images, held)
        if keep.any():
            yield images[keep], feats[keep]
