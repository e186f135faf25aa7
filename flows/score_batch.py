"""The `score-batch` flow: score every new image under a bucket prefix with a registered model.

    resolve model (models:/patchcore-<category>@champion, or a version) ─▶ list images ─▶ score shards
      ─▶ predictions parts, masks, heatmaps under the results prefix ─▶ combined predictions.parquet
      ─▶ MLflow scoring run (counts, anomaly rate) + Prefect table artifact

Idempotent and resumable: an image already scored by the same model version (by the sha256 of its bytes) is
skipped, and a shard's part is written last, so a killed run resumes where it stopped. A bad file is an
`error` row, never a reason to stop the batch. Shards are tasks, so a parallel task runner runs them at once.
"""

from __future__ import annotations

import uuid

from prefect import flow
from prefect.artifacts import create_table_artifact

from tasks.reporting import artifact_key
from tasks.score_batch import combine_predictions, list_images, parse_model_uri, resolve_model, score_shard
from tasks.settings import get_settings
from tasks.tracking import client_for, registered_model_name, tracked_run

SCORING_EXPERIMENT = "patchcore-scoring"


@flow(name="score-batch", result_serializer="json")
def score_batch(images_url: str, results_url: str, category: str | None = None, model_uri: str | None = None,
                shard_size: int = 64, work_dir: str | None = None) -> dict:
    """Score `images_url` (s3://, file:// or a path) into `results_url` with `model_uri` (default: the champion
    of `category`). Returns the counts and the anomaly rate."""
    if model_uri is None:
        if not category:
            raise ValueError("score-batch needs category (scores with its champion) or model_uri")
        model_uri = f"models:/{registered_model_name(category)}@champion"
    parse_model_uri(model_uri)
    if shard_size < 1:
        raise ValueError(f"setting shard_size: must be an integer >= 1 (got {shard_size})")
    work = str(get_settings().resolve_work_dir(work_dir))
    params = {"images_url": images_url, "results_url": results_url, "model_uri": model_uri, "shard_size": shard_size}
    with tracked_run(work, SCORING_EXPERIMENT, f"score-batch-{parse_model_uri(model_uri)[0]}", params=params,
                     tags={"mode": "score-batch"}) as run_id:
        model = resolve_model(work, model_uri)
        keys = list_images(images_url)
        run_tag = uuid.uuid4().hex[:8]
        shards = [score_shard(model, images_url, keys[i : i + shard_size], i // shard_size, results_url, work, run_tag)
                  for i in range(0, len(keys), shard_size)]
        combined = combine_predictions(results_url)
        summary = {
            "model": f"{model.name} v{model.version}", "n_images": len(keys),
            "n_scored": sum(s.n_scored for s in shards), "n_already_scored": sum(s.n_already_scored for s in shards),
            "n_errors": sum(s.n_errors for s in shards), "n_anomalous": sum(s.n_anomalous for s in shards),
            "predictions": combined,
        }
        summary["anomaly_rate"] = summary["n_anomalous"] / summary["n_scored"] if summary["n_scored"] else None
        client = client_for(work)
        client.set_tag(run_id, "model_version", f"{model.name}/{model.version}")
        for key in ("n_images", "n_scored", "n_already_scored", "n_errors", "n_anomalous", "anomaly_rate"):
            if summary[key] is not None:
                client.log_metric(run_id, key, float(summary[key]))
        create_table_artifact(
            table=[s.model_dump(exclude={"predictions"}) for s in shards] or [{"shard": None, "n_images": 0}],
            key=artifact_key(f"patchcore-score-batch-{model.name}"),
            description=f"score-batch with {model.name} v{model.version}: {summary['n_scored']} scored, "
                        f"{summary['n_already_scored']} already scored, {summary['n_errors']} errors, "
                        f"anomaly rate {summary['anomaly_rate']}")
    return summary
