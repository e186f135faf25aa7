"""The `patchcore` flow and its deployments' two modes: `full-benchmark` and `nightly-retrain`.

    fetch ─▶ extract(train) ─▶ coreset ─▶ index ─┐
      └────▶ extract(test) ──────────────────────┴─▶ score ─▶ metrics ─▶ MLflow (run, model, registry)

Flows pass URIs and small configs between tasks and never touch arrays; every stage is a task in `tasks/`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from patchcore_core.config import DetectorParams
from patchcore_core.data import list_categories as list_categories_lib
from patchcore_core.stages.extract import SplitFeatures
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult
from patchcore_core.stages.metrics import MetricsResult
from patchcore_core.stages.score import ScoreResult
from tasks.gc import sweep_dead_runs_task
from tasks.paper_report import publish_report, run_report_grid
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    Champion,
    PromotionDecision,
    champion_version,
    current_champion,
    decide_promotion,
    log_promotion,
    promotion_lock,
    set_alias,
)
from tasks.reporting import publish_benchmark, publish_promotions
from tasks.settings import get_settings
from tasks.stages import (
    build_index,
    calibrate_thresholds,
    compute_metrics,
    extract_features,
    fetch_category,
    fit_and_score_baseline,
    score_test_split,
    select_coreset,
)
from tasks.tracking import (
    CategoryRun,
    end_run,
    log_category,
    log_results_table,
    registered_model_name,
    start_run,
    tracked_run,
    tracking_uri,
)

BENCHMARK_EXPERIMENT = "patchcore-benchmark"
RETRAIN_EXPERIMENT = "patchcore-retrain"


class TrainedAndEvaluated(BaseModel):
    fetched: FetchResult
    canary: FetchResult
    test_features: SplitFeatures | None  # None for the baselines, which keep no feature shards
    model: ModelResult
    scores: ScoreResult
    evaluation: MetricsResult


@task(name="list-categories", cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 5, 15])
def list_categories(data_url: str) -> list[str]:
    return list_categories_lib(data_url, storage_options=get_settings().storage_options(data_url))


def train_and_evaluate(
    data_url: str, canary_url: str, category: str, config: DetectorParams, work_dir: str
) -> TrainedAndEvaluated:
    """The six stages for one category: train on `data_url`, evaluate on the test split of `canary_url`."""
    fetched = fetch_category(data_url, category, work_dir)
    if config.method != "patchcore":  # SPADE / PaDiM: one fit+score stage, then the same metrics
        if canary_url != data_url:
            raise ValueError(f"method={config.method!r} evaluates on the training dataset's test split only")
        run = fit_and_score_baseline(fetched, config, work_dir)
        evaluation = compute_metrics(run.scores, fetched, run.model, work_dir)
        return TrainedAndEvaluated(fetched=fetched, canary=fetched, test_features=None, model=run.model,
                                   scores=run.scores, evaluation=evaluation)
    canary = fetched if canary_url == data_url else fetch_category(canary_url, category, work_dir)
    train_features = extract_features(fetched, config, work_dir, split="train")
    test_features = extract_features(canary, config, work_dir, split="test")
    coreset = select_coreset(train_features, config, work_dir)
    calibration = calibrate_thresholds(train_features, config, work_dir)
    model = build_index(coreset, config, work_dir, calibration)
    scores = score_test_split(model, test_features, canary, work_dir)
    evaluation = compute_metrics(scores, canary, model, work_dir)
    return TrainedAndEvaluated(fetched=fetched, canary=canary, test_features=test_features, model=model,
                               scores=scores, evaluation=evaluation)


@flow(name="benchmark-category", flow_run_name="benchmark-{category}", result_serializer="json")
def benchmark_category(
    data_url: str, category: str, config: DetectorParams, work_dir: str, parent_run_id: str,
    experiment: str = BENCHMARK_EXPERIMENT, register_models: bool = True,
) -> CategoryRun:
    with tracked_run(work_dir, experiment, category, parent_run_id=parent_run_id,
                     tags={"category": category}) as run_id:
        out = train_and_evaluate(data_url, data_url, category, config, work_dir)
        register_as = registered_model_name(category) if register_models and config.method == "patchcore" else None
        return log_category(work_dir, run_id, config, out.fetched, out.model, out.scores, out.evaluation,
                            register_as=register_as)


@flow(name="full-benchmark", result_serializer="json")
def full_benchmark(
    data_url: str, categories: list[str] | None = None, config: DetectorParams | None = None,
    work_dir: str | None = None, experiment: str = BENCHMARK_EXPERIMENT, register_models: bool = True,
) -> list[CategoryRun]:
    """Every category under `data_url` (or the given ones): one MLflow parent run, one nested run each."""
    logger = get_run_logger()
    config = config or DetectorParams()
    work = str(get_settings().resolve_work_dir(work_dir))
    sweep_dead_runs_task(work)  # runs a killed process left RUNNING: FAILED (MLflow) and Crashed (Prefect)
    categories = categories or list_categories(data_url)
    parent = start_run(work, experiment, "full-benchmark", params={"data_url": data_url, "categories": categories,
                                                                   **config.model_dump()})
    per_category = benchmark_category
    runs, failed = [], []
    for category in categories:
        state = per_category(data_url, category, config, work, parent, experiment, register_models,
                             return_state=True)
        if state.is_completed():
            runs.append(CategoryRun.model_validate(state.result()))  # a result read back from storage is JSON
        else:
            failed.append(category)
            logger.error(f"category {category} failed: {state.message}")
    log_results_table(work, parent, runs)
    publish_benchmark(runs, failed, parent, tracking_uri(work))
    end_run(work, parent, "FAILED" if failed else "FINISHED")
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(categories)} categories failed: {', '.join(failed)}")
    return runs


def evaluate_champion(champion: Champion, canary: FetchResult, category: str, work_dir: str) -> MetricsResult:
    """Re-score the champion on today's canary set with its own settings (stages keyed on its model bytes)."""
    champion_test = extract_features(canary, champion.config, work_dir, split="test")
    champion_scores = score_test_split(champion.model, champion_test, canary, work_dir)
    return compute_metrics(champion_scores, canary, champion.model, work_dir,
                           title=f"{category} champion v{champion.version}")


@flow(name="retrain-category", flow_run_name="retrain-{category}", result_serializer="json")
def retrain_category(
    data_url: str, canary_url: str, category: str, config: DetectorParams, work_dir: str, parent_run_id: str,
    experiment: str = RETRAIN_EXPERIMENT, metric: str = "image_auroc", min_delta: float = 0.0,
) -> PromotionDecision:
    """Train, evaluate on the canary set, register as challenger; promote to champion unless it is worse.

    The promotion is a compare-and-set: the champion is re-scored outside the lock (the slow part), then inside
    `promotion_lock` the champion is read again and, if another run moved it meanwhile, the new champion is
    re-scored on the same canary set before the decision; the alias moves before the lock is released.
    """
    logger = get_run_logger()
    name = registered_model_name(category)
    with tracked_run(work_dir, experiment, category, parent_run_id=parent_run_id,
                     tags={"category": category, "canary_url": canary_url}) as run_id:
        out = train_and_evaluate(data_url, canary_url, category, config, work_dir)
        logged = log_category(work_dir, run_id, config, out.fetched, out.model, out.scores, out.evaluation,
                              register_as=name, canary=out.canary)
        set_alias(work_dir, name, CHALLENGER, logged.registered_version)
        champion = current_champion(work_dir, name, category)
        champion_eval = evaluate_champion(champion, out.canary, category, work_dir) if champion else None
        with promotion_lock(name):
            now = champion_version(work_dir, name)
            compared = champion.version if champion else None
            if now != compared:
                logger.info(f"promotion of {name}: the champion moved from {compared and 'v' + compared} to "
                            f"{now and 'v' + now} since the comparison; comparing again on the same canary set")
                champion = current_champion(work_dir, name, category)
                champion_eval = evaluate_champion(champion, out.canary, category, work_dir) if champion else None
            decision = decide_promotion(name, out.evaluation, logged.registered_version, champion_eval,
                                        champion.version if champion else None, metric, min_delta)
            decision = decision.model_copy(update={"recompared": now != compared})
            if decision.promote:
                set_alias(work_dir, name, CHAMPION, logged.registered_version)
        logger.info(decision.summary())
        log_promotion(work_dir, run_id, decision, out.evaluation.metrics,
                      champion_eval.metrics if champion_eval is not None else None)
    return decision


@flow(name="nightly-retrain", result_serializer="json")
def nightly_retrain(
    data_url: str, product_line: str = "default", categories: list[str] | None = None,
    canary_url: str | None = None, config: DetectorParams | None = None, work_dir: str | None = None,
    experiment: str = RETRAIN_EXPERIMENT, metric: str = "image_auroc", min_delta: float = 0.0,
) -> list[PromotionDecision]:
    """Retrain a product line's categories and promote each challenger that is not worse than its champion."""
    config = config or DetectorParams()
    if config.method != "patchcore":
        raise ValueError(f"nightly-retrain registers PatchCore models only, not method={config.method!r}")
    work = str(get_settings().resolve_work_dir(work_dir))
    sweep_dead_runs_task(work)  # runs a killed process left RUNNING: FAILED (MLflow) and Crashed (Prefect)
    categories = categories or list_categories(data_url)
    canary = canary_url or data_url
    params = {"product_line": product_line, "data_url": data_url, "canary_url": canary, "categories": categories,
              "promotion_metric": metric, "min_delta": min_delta, **config.model_dump()}
    per_category = retrain_category
    with tracked_run(work, experiment, f"nightly-retrain-{product_line}", params=params,
                     tags={"product_line": product_line}) as parent:
        decisions = [per_category(data_url, canary, category, config, work, parent, experiment, metric, min_delta)
                     for category in categories]
        publish_promotions(decisions, product_line)
    return decisions


@flow(name="paper-report", result_serializer="json")
def paper_report(
    data_url: str, categories: list[str] | None = None, work_dir: str | None = None,
    report: dict[str, Any] | None = None,
) -> str:
    """SPADE, PaDiM and PatchCore-25/10/1% with the paper's ablations and timings as one Markdown report.

    `report` overrides `experiments.paper_report.ReportConfig` settings (grid settings, or detector settings by
    their `DetectorParams` name, which go into its `base`).
    Returns the MLflow run id holding the report, its tables and figures.
    """
    work = str(get_settings().resolve_work_dir(work_dir))
    settings = report or {}
    grid = run_report_grid(data_url, categories, str(Path(work) / "paper-report"), settings)
    return publish_report(grid, work, {"data_url": data_url, "categories": categories, **settings})


@flow(name="patchcore", result_serializer="json")
def patchcore(
    mode: Literal["full-benchmark", "nightly-retrain", "paper-report", "score-batch"] = "full-benchmark",
    data_url: str = "runs/demo/bucket/mvtec-demo",
    categories: list[str] | None = None,
    config: DetectorParams | None = None,
    work_dir: str | None = None,
    product_line: str = "default",
    canary_url: str | None = None,
    promotion_metric: str = "image_auroc",
    min_delta: float = 0.0,
    report: dict[str, Any] | None = None,
    results_url: str | None = None,
    model_uri: str | None = None,
    shard_size: int = 64,
) -> list[CategoryRun] | list[PromotionDecision] | str | dict:
    """PatchCore batch pipeline. `full-benchmark`: every category (or `categories`) of `data_url`, with the
    results table. `nightly-retrain`: the product line's `categories`, champion/challenger promotion.
    `paper-report`: the SPADE / PaDiM / PatchCore tables and ablations (`report` overrides its settings).
    `score-batch`: every new image under `data_url` scored with the champion of the one category in
    `categories` (or `model_uri`), results under `results_url` (see flows/score_batch.py).
    """
    if mode == "full-benchmark":
        return full_benchmark(data_url, categories, config, work_dir)
    if mode == "paper-report":
        return paper_report(data_url, categories, work_dir, report)
    if mode == "score-batch":
        from flows.score_batch import score_batch

        if not results_url or (model_uri is None and len(categories or []) != 1):
            raise ValueError("mode score-batch needs results_url, and one category in categories or a model_uri")
        return score_batch(data_url, results_url, category=(categories or [None])[0], model_uri=model_uri,
                           shard_size=shard_size, work_dir=work_dir)
    return nightly_retrain(data_url, product_line, categories, canary_url, config, work_dir,
                           metric=promotion_metric, min_delta=min_delta)
