"""The pipeline stages as Prefect tasks: one thin wrapper per `patchcore_core.stages` module.

Each task passes its typed inputs to the stage's `run` with the runtime from the settings; the stage's typed
result is the task's return value. Credentials come from the settings, never from task parameters.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from patchcore_core.config import DetectorParams
from patchcore_core.stages import baseline, calibrate, coreset, extract, fetch, index, metrics, score
from tasks.common import STAGE_TASK, log, runtime
from tasks.gc import touch_used
from tasks.settings import get_settings


@task(name="fetch", task_run_name="fetch-{category}", **STAGE_TASK)
def fetch_category(data_url: str, category: str, work_dir: str) -> fetch.FetchResult:
    return fetch.run(data_url, category, work_dir, get_settings().storage_options(data_url), log=log)


@task(name="plan-extract", task_run_name="plan-{fetched.category}-{split}", **STAGE_TASK)
def plan_extract(fetched: fetch.FetchResult, params: DetectorParams, work_dir: str, split: str,
                 images_per_shard: int) -> extract.SplitPlan:
    """List the split and fingerprint its shards once; every part task and the finish read this plan."""
    return extract.plan(fetched, params, split, work_dir, images_per_shard)


@task(name="extract-part", task_run_name="extract-{split_plan.category}-{split_plan.split}-{index}", **STAGE_TASK)
def extract_part(split_plan: extract.SplitPlan, params: DetectorParams, index: int) -> bool:
    """Write (or reuse) shard `index` of the planned split; True when it was written."""
    return extract.write_part(split_plan.shards[index], params, runtime())


@task(name="extract", task_run_name="extract-{split_plan.category}-{split_plan.split}", **STAGE_TASK)
def finish_extract(split_plan: extract.SplitPlan, written: list[bool]) -> extract.SplitFeatures:
    """Mark a split's shards complete once every part task has run; `written` holds their results."""
    result = extract.finish(split_plan, sum(written))
    touch_used(*{Path(p).parent for p in result.shards})  # retention (tasks.gc) counts from the last use
    log(f"{split_plan.category}/{split_plan.split}: {len(result.shards)} shards ({result.n_reused} reused, "
        f"{result.n_written} written)")
    return result


@task(name="coreset", task_run_name="coreset-{features.category}", **STAGE_TASK)
def select_coreset(features: extract.SplitFeatures, params: DetectorParams, work_dir: str) -> coreset.CoresetResult:
    result = coreset.run(features, params, work_dir, runtime())
    touch_used(result.directory)
    return result


@task(name="calibrate", task_run_name="calibrate-{features.category}", **STAGE_TASK)
def calibrate_thresholds(features: extract.SplitFeatures, params: DetectorParams,
                         work_dir: str) -> calibrate.CalibrationResult:
    result = calibrate.run(features, params, work_dir, runtime())
    touch_used(Path(result.path).parent)
    return result


@task(name="index", task_run_name="index-{selected.category}", **STAGE_TASK)
def build_index(selected: coreset.CoresetResult, params: DetectorParams, work_dir: str,
                calibration: calibrate.CalibrationResult | None = None) -> index.ModelResult:
    result = index.run(selected, params, work_dir, runtime(), calibration=calibration)
    touch_used(Path(result.model_dir).parent)
    return result


@task(name="score-part", task_run_name="score-{model.category}-{index}", **STAGE_TASK)
def score_part(model: index.ModelResult, features: extract.SplitFeatures, work_dir: str, index: int) -> str:
    """Score test shard `index` into its part of the score stage."""
    return score.score_part(model, features, index, work_dir, runtime())


@task(name="score", task_run_name="score-{model.category}", **STAGE_TASK)
def merge_scores(model: index.ModelResult, features: extract.SplitFeatures, fetched: fetch.FetchResult,
                 work_dir: str, parts: list[str]) -> score.ScoreResult:
    """Assemble the score parts into predictions.parquet and the maps, once every part task has run."""
    result = score.merge(model, features, fetched, work_dir, runtime())
    touch_used(Path(result.predictions).parent)
    return result


@task(name="metrics", task_run_name="metrics-{scores.category}", **STAGE_TASK)
def compute_metrics(scores: score.ScoreResult, fetched: fetch.FetchResult, model: index.ModelResult,
                    work_dir: str, title: str = "") -> metrics.MetricsResult:
    result = metrics.run(scores, fetched, model, work_dir, title=title)
    touch_used(Path(result.metrics_path).parent)
    return result


@task(name="baseline", task_run_name="baseline-{fetched.category}", **STAGE_TASK)
def fit_and_score_baseline(fetched: fetch.FetchResult, params: DetectorParams,
                           work_dir: str) -> baseline.BaselineResult:
    result = baseline.run(fetched, params, work_dir, runtime())
    touch_used(Path(result.model.model_dir).parent, Path(result.scores.predictions).parent)
    return result
