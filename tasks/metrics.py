"""Stage 6, metrics: the `patchcore_core.metrics` set, ROC/PR and PRO figures, worst/best heatmap overlays."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from patchcore_core.stages import ScoreResult, evaluate_scores
from tasks.common import STAGE_TASK, to_path, to_uri
from tasks.contracts import EvaluationResult, FetchedCategory, SplitScores, TrainedModel


@task(name="metrics", task_run_name="metrics-{scores.category}", **STAGE_TASK)
def compute_metrics(
    scores: SplitScores, fetched: FetchedCategory, model: TrainedModel, work_dir: str, title: str = ""
) -> EvaluationResult:
    """Compute and write metrics.json and the figures of one category's test split."""
    predictions = to_path(scores.predictions_uri)
    result = evaluate_scores(
        ScoreResult(str(predictions.parent), str(predictions), str(to_path(scores.maps_uri)),
                    str(to_path(scores.masks_uri)), scores.n_images, scores.fingerprint, scores.seconds_per_image),
        str(to_path(fetched.root_uri)), scores.category, Path(work_dir) / "stages",
        image_size=int(model.params["image_size"]), resize=model.params.get("resize"), title=title,
    )
    return EvaluationResult(
        category=scores.category, metrics=result.metrics, metrics_uri=to_uri(result.metrics_path),
        figure_uris={name: to_uri(p) for name, p in result.figures.items()},
    )
