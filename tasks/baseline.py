"""SPADE / PaDiM as one pipeline stage (fit, save, score the test split); metrics and logging are shared."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from pydantic import BaseModel

from patchcore_core.stages import fit_score_baseline
from tasks.common import STAGE_TASK, to_path, to_uri
from tasks.contracts import FetchedCategory, ModelConfig, SplitScores, TrainedModel
from tasks.settings import get_settings


class BaselineRun(BaseModel):
    model: TrainedModel
    scores: SplitScores


@task(name="baseline", task_run_name="baseline-{fetched.category}", **STAGE_TASK)
def fit_and_score_baseline(fetched: FetchedCategory, config: ModelConfig, work_dir: str) -> BaselineRun:
    """Fit `config.method` (spade or padim) on the train split and score the test split."""
    settings = get_settings()
    params = config.patchcore_params()
    model_dir, result = fit_score_baseline(
        config.method, params, str(to_path(fetched.root_uri)), fetched.category, fetched.digest,
        Path(work_dir) / "stages", device=settings.device, num_threads=settings.threads,
    )
    model = TrainedModel(category=fetched.category, model_uri=to_uri(model_dir), model_uris={"": to_uri(model_dir)},
                         primary_index="", fingerprint=result.fingerprint, params=config.model_dump())
    scores = SplitScores(category=fetched.category, predictions_uri=to_uri(result.predictions),
                         maps_uri=to_uri(result.maps), masks_uri=to_uri(result.masks), n_images=result.n_images,
                         fingerprint=result.fingerprint, seconds_per_image=result.seconds_per_image)
    return BaselineRun(model=model, scores=scores)
