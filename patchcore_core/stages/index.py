"""Stage 4, index: a faiss index over the selected memory bank, saved as a complete PatchCore model folder
(config.json + memory_bank.npy + index.faiss). It needs no backbone: the bank is already patch features."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from patchcore_core.artifacts import INDEX_FILE, StageDir, fingerprint
from patchcore_core.config import DetectorParams
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime
from patchcore_core.stages.calibrate import CalibrationResult
from patchcore_core.stages.coreset import CoresetResult, read_coreset

__all__ = ["ModelResult", "run"]


class ModelResult(BaseModel):
    """A saved detector folder and the settings it was made with (`params` is the schema's `model_dump`)."""

    category: str
    model_dir: str
    fingerprint: str
    params: dict[str, Any]


def run(coreset: CoresetResult, params: DetectorParams, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME, calibration: CalibrationResult | None = None) -> ModelResult:
    """Index the coreset with the `model` settings (faiss kind, neighbours, eq. 7, distance) and save the model,
    with the calibrated thresholds when given."""
    from patchcore_core.baselines import make_detector

    out = StageDir.of(Path(work_dir) / "stages", coreset.category, "index",
                      fingerprint("index", params.stage_params("model"), coreset.fingerprint,
                                  calibration.fingerprint if calibration else None))
    if (done := out.finished()) is not None:
        return ModelResult(**done)
    _, bank = read_coreset(coreset.path)
    model = make_detector("patchcore", strict=False, **params.estimator_params(), **runtime.estimator_kwargs())
    model.fit_memory_bank(bank, tuple(coreset.grid), coreset.n_train_patches)
    model.set_calibration(calibration.calibration if calibration else None)
    model_dir = model.save(out / "model")
    result = ModelResult(category=coreset.category, model_dir=str(model_dir), fingerprint=out.fingerprint,
                         params=params.model_dump())
    out.finish(result.model_dump(), outputs=[model_dir / INDEX_FILE])
    return result
