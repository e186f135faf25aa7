"""Stage 5, score: image scores and anomaly maps of the test split, from the test shards."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from patchcore_core.stages import score_split
from tasks.common import STAGE_TASK, to_path, to_uri
from tasks.contracts import ExtractedFeatures, FetchedCategory, SplitScores, TrainedModel
from tasks.extract import split_features
from tasks.settings import get_settings


@task(name="score", task_run_name="score-{model.category}", **STAGE_TASK)
def score_test_split(
    model: TrainedModel, features: ExtractedFeatures, fetched: FetchedCategory, work_dir: str
) -> SplitScores:
    """Write predictions.parquet, anomaly_maps.npy and gt_masks.npy for the test split."""
    settings = get_settings()
    result = score_split(
        str(to_path(model.model_uri)), split_features(features, "test"), str(to_path(fetched.root_uri)),
        Path(work_dir) / "stages", device=settings.device, num_threads=settings.threads,
    )
    return SplitScores(
        category=model.category, predictions_uri=to_uri(result.predictions), maps_uri=to_uri(result.maps),
        masks_uri=to_uri(result.masks), n_images=result.n_images, fingerprint=result.fingerprint,
        seconds_per_image=result.seconds_per_image,
    )
