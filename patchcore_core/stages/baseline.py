"""SPADE or PaDiM as one stage: fit on the train split, save the model, score the test split.

The baselines keep no patch bank worth sharding, so extract/coreset/index/score collapse into this one step;
its outputs (a model folder and the score artifacts) are those of the index and score stages.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from pydantic import BaseModel

from patchcore_core.artifacts import CONFIG_FILE, StageDir, fingerprint
from patchcore_core.config import DetectorParams
from patchcore_core.data import list_category, load_masks
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult
from patchcore_core.stages.score import ScoreResult, finish_scores

__all__ = ["BaselineResult", "run"]


class BaselineResult(BaseModel):
    model: ModelResult
    scores: ScoreResult


def run(fetched: FetchResult, params: DetectorParams, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME) -> BaselineResult:
    """Fit `params.method` (spade or padim) on the train split and score the test split."""
    from patchcore_core.baselines import make_detector

    estimator_params = params.estimator_params()
    out = StageDir.of(Path(work_dir) / "stages", fetched.category, f"baseline-{params.method}",
                      fingerprint("baseline", params.method, estimator_params, fetched.digest))
    model_dir = out / "model"
    if (done := out.finished()) is not None and (model_dir / CONFIG_FILE).is_file():
        return BaselineResult(model=ModelResult(**done["model"]), scores=ScoreResult(**done["scores"]))
    listing = list_category(fetched.root, fetched.category)
    detector = make_detector(params.method, strict=False, **estimator_params, **runtime.estimator_kwargs())
    detector.fit([s.path for s in listing.train])
    detector.save(model_dir)
    start = time.perf_counter()
    scores, maps = detector.predict([s.path for s in listing.test])
    elapsed = time.perf_counter() - start
    masks = load_masks(listing.test, detector.resize, detector.image_size)
    model = ModelResult(category=fetched.category, model_dir=str(model_dir), fingerprint=out.fingerprint,
                        params=params.model_dump())
    scored = finish_scores(out, listing, scores, maps, masks, elapsed)
    result = BaselineResult(model=model, scores=scored)
    out.finish(result.model_dump(), outputs=[model_dir / CONFIG_FILE, scored.predictions, scored.maps, scored.masks])
    return result
