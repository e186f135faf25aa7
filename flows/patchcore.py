"""The `patchcore` flow and its deployments' modes: `full-benchmark`, `nightly-retrain`, `paper-report`, `score-batch`.

    fetch ─▶ extract(train) ─▶ coreset ──────▶ index ─┐
      │        (a task per shard) calibrate ─┘        │
      └────▶ extract(test) ───────────────────────────┴─▶ score ─▶ metrics ─▶ MLflow (run, model, registry)
               (a task per shard)                     (a task per shard)

Flows pass URIs and small configs between tasks and never touch arrays; every stage is a task in `tasks/`.
The stages of all categories are submitted to the flow's task runner (flows/task_runner.py): one thread by
default, a Dask cluster when configured, where categories and shards run in parallel. With
`category_deployment`, each category is instead a flow run of that deployment (`run_deployment`), which a work
pool's workers pick up on their own machines; the parent collects the results table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_client, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.futures import PrefectFuture
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from flows.task_runner import explain_lost_worker, task_runner
from patchcore_core.config import DetectorParams
from patchcore_core.data import list_categories as list_categories_lib
from patchcore_core.stages import extract
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
    extract_part,
    fetch_category,
    finish_extract,
    fit_and_score_baseline,
    merge_scores,
    plan_extract,
    score_part,
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


def images_per_shard() -> int:
    """The shard size, read in the flow and passed to the tasks, so that every worker cuts the same shards."""
    return get_settings().images_per_shard or extract.IMAGES_PER_SHARD


def submit_features(fetched: FetchResult, config: DetectorParams, work_dir: str, split: str) -> PrefectFuture:
    """One extraction task per shard of the split, then the task that marks the split complete."""
    size = images_per_shard()
    split_plan = plan_extract.submit(fetched, config, work_dir, split, size)
    parts = [extract_part.submit(split_plan, config, i) for i in range(extract.n_shards(fetched, split, size))]
    return finish_extract.submit(split_plan, parts)


def submit_scores(model: Any, test: Any, canary: FetchResult, work_dir: str) -> PrefectFuture:
    """One scoring task per test shard, then the task that writes predictions.parquet and the maps."""
    parts = [score_part.submit(model, test, work_dir, i)
             for i in range(extract.n_shards(canary, "test", images_per_shard()))]
    return merge_scores.submit(model, test, canary, work_dir, parts)


@dataclass
class Submitted:
    """One category's stages, submitted: the futures to wait on, in submission order."""

    fetched: FetchResult
    canary: FetchResult
    outputs: dict[str, PrefectFuture]
    futures: list[PrefectFuture] = field(default_factory=list)

    def result(self, work_dir: str) -> TrainedAndEvaluated:
        """Wait for the stages; the first failed stage's error is raised (its dependants only say 'upstream')."""
        for future in self.futures:
            future.wait()
        for future in self.futures:
            if not future.state.is_completed():
                future.result()  # raises the stage's own error
        out = {name: future.result() for name, future in self.outputs.items()}
        if "baseline" in out:  # SPADE / PaDiM: one fit+score stage, then the same metrics
            run = out["baseline"]
            out = {"test_features": None, "model": run.model, "scores": run.scores,
                   "evaluation": compute_metrics(run.scores, self.fetched, run.model, work_dir)}
        return TrainedAndEvaluated(fetched=self.fetched, canary=self.canary, **out)


def submit_stages(fetched: FetchResult, canary: FetchResult, config: DetectorParams, work_dir: str) -> Submitted:
    """The stage diagram of one category on the flow's task runner: train on `fetched`, evaluate on `canary`."""
    if config.method != "patchcore":
        if canary.source_url != fetched.source_url:
            raise ValueError(f"method={config.method!r} evaluates on the training dataset's test split only")
        baseline = fit_and_score_baseline.submit(fetched, config, work_dir)
        return Submitted(fetched, fetched, {"baseline": baseline}, [baseline])
    train = submit_features(fetched, config, work_dir, "train")
    test = submit_features(canary, config, work_dir, "test")
    coreset = select_coreset.submit(train, config, work_dir)
    calibration = calibrate_thresholds.submit(train, config, work_dir)
    model = build_index.submit(coreset, config, work_dir, calibration)
    scores = submit_scores(model, test, canary, work_dir)
    evaluation = compute_metrics.submit(scores, canary, model, work_dir)
    outputs = {"test_features": test, "model": model, "scores": scores, "evaluation": evaluation}
    return Submitted(fetched, canary, outputs, [train, test, coreset, calibration, model, scores, evaluation])


def train_categories(
    data_url: str, canary_url: str, categories: list[str], config: DetectorParams, work_dir: str
) -> dict[str, TrainedAndEvaluated | Exception]:
    """Every category's stages at once on the task runner (in parallel on a cluster); a failure stays its own."""
    fetches = {c: fetch_category.submit(data_url, c, work_dir) for c in categories}
    canaries = {c: fetches[c] if canary_url == data_url else fetch_category.submit(canary_url, c, work_dir)
                for c in categories}
    submitted: dict[str, Submitted] = {}
    outcomes: dict[str, TrainedAndEvaluated | Exception] = {}
    for category in categories:
        try:
            submitted[category] = submit_stages(fetches[category].result(), canaries[category].result(),
                                                config, work_dir)
        except Exception as exc:  # noqa: BLE001 - reported per category by the caller
            outcomes[category] = explain_lost_worker(exc)
    for category, pending in submitted.items():
        try:
            outcomes[category] = pending.result(work_dir)
        except Exception as exc:  # noqa: BLE001 - reported per category by the caller
            outcomes[category] = explain_lost_worker(exc)
    return {c: outcomes[c] for c in categories}


def train_and_evaluate(
    data_url: str, canary_url: str, category: str, config: DetectorParams, work_dir: str
) -> TrainedAndEvaluated:
    """The stages for one category: train on `data_url`, evaluate on the test split of `canary_url`."""
    outcome = train_categories(data_url, canary_url, [category], config, work_dir)[category]
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def run_category_deployments(deployment: str, categories: list[str], parameters: Callable[[str], dict],
                             poll_seconds: float = 2.0) -> dict[str, Any | Exception]:
    """One flow run of `deployment` per category (its workers run them, in parallel where a pool has several);
    waits for all and returns each run's result, or the error it failed with."""
    from prefect.deployments import run_deployment

    logger = get_run_logger()
    runs = {c: run_deployment(deployment, parameters=parameters(c), timeout=0) for c in categories}
    logger.info(f"{len(runs)} flow runs of {deployment}: " + ", ".join(f"{c}={r.name}" for c, r in runs.items()))
    category_of = {run.id: c for c, run in runs.items()}
    outcomes: dict[str, Any | Exception] = {}
    with get_client(sync_client=True) as client:
        while len(outcomes) < len(runs):  # one API call per poll for all the runs still going
            going = [run_id for run_id, c in category_of.items() if c not in outcomes]
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=going)),
                                             limit=len(going)):
                if run.state is not None and run.state.is_final():
                    try:
                        outcomes[category_of[run.id]] = run.state.result()
                    except Exception as exc:  # noqa: BLE001 - reported per category by the caller
                        outcomes[category_of[run.id]] = exc
            if len(outcomes) < len(runs):
                time.sleep(poll_seconds)
    return {c: outcomes[c] for c in categories}


def run_categories_here(
    data_url: str, canary_url: str, categories: list[str], config: DetectorParams, work_dir: str, parent_run_id: str,
    experiment: str, tags: Callable[[str], dict], subflow: Callable[[str, TrainedAndEvaluated, str], Any],
) -> dict[str, Any | Exception]:
    """Every category's stages at once on this flow's task runner, then `subflow(category, trained, run_id)` for
    each (logging, registration, promotion) into its nested MLflow run, started first so that it is RUNNING
    while the stages run (and swept if the process dies). Returns each subflow's result, or the error."""
    nested = {c: start_run(work_dir, experiment, c, parent_run_id=parent_run_id, tags=tags(c)) for c in categories}
    outcomes: dict[str, Any | Exception] = {}
    for category, out in train_categories(data_url, canary_url, categories, config, work_dir).items():
        if isinstance(out, Exception):
            end_run(work_dir, nested[category], "FAILED", error=out)
            outcomes[category] = out
            continue
        state = subflow(category, out, nested[category])
        outcomes[category] = state.result() if state.is_completed() else RuntimeError(state.message)
    return outcomes


def category_tags(category: str, canary_url: str | None = None) -> dict[str, str]:
    """The tags of a category's nested MLflow run."""
    return {"category": category, **({"canary_url": canary_url} if canary_url else {})}


ONE_THREAD = ThreadPoolTaskRunner(max_workers=1)  # a subflow handed its trained stages needs no cluster of its own


@flow(name="benchmark-category", flow_run_name="benchmark-{category}", result_serializer="json",
      task_runner=task_runner())
def benchmark_category(
    data_url: str, category: str, config: DetectorParams, work_dir: str, parent_run_id: str,
    experiment: str = BENCHMARK_EXPERIMENT, register_models: bool = True, trained: TrainedAndEvaluated | None = None,
    mlflow_run_id: str | None = None,
) -> CategoryRun:
    """One category: its stages (unless the parent already ran them: `trained`, logged into its nested MLflow
    run `mlflow_run_id`), its nested MLflow run, its model."""
    with tracked_run(work_dir, experiment, category, run_id=mlflow_run_id, parent_run_id=parent_run_id,
                     tags=category_tags(category)) as run_id:
        out = trained or train_and_evaluate(data_url, data_url, category, config, work_dir)
        register_as = registered_model_name(category) if register_models and config.method == "patchcore" else None
        return log_category(work_dir, run_id, config, out.fetched, out.model, out.scores, out.evaluation,
                            register_as=register_as)


@flow(name="full-benchmark", result_serializer="json", task_runner=task_runner())
def full_benchmark(
    data_url: str, categories: list[str] | None = None, config: DetectorParams | None = None,
    work_dir: str | None = None, experiment: str = BENCHMARK_EXPERIMENT, register_models: bool = True,
    category_deployment: str | None = None,
) -> list[CategoryRun]:
    """Every category under `data_url` (or the given ones): one MLflow parent run, one nested run each.

    The categories' stages run at once on the task runner; with `category_deployment` ("benchmark-category/…"),
    each category is a flow run of that deployment instead, on whichever workers its pool has.
    """
    logger = get_run_logger()
    config = config or DetectorParams()
    work = str(get_settings().resolve_work_dir(work_dir))
    sweep_dead_runs_task(work)  # runs a killed process left RUNNING: FAILED (MLflow) and Crashed (Prefect)
    categories = categories or list_categories(data_url)
    parent = start_run(work, experiment, "full-benchmark", params={"data_url": data_url, "categories": categories,
                                                                   **config.model_dump()})
    if category_deployment:
        outcomes = run_category_deployments(category_deployment, categories, lambda c: {
            "data_url": data_url, "category": c, "config": config.model_dump(), "work_dir": work,
            "parent_run_id": parent, "experiment": experiment, "register_models": register_models})
    else:
        outcomes = run_categories_here(
            data_url, data_url, categories, config, work, parent, experiment, category_tags,
            lambda c, out, run_id: benchmark_category.with_options(task_runner=ONE_THREAD)(
                data_url, c, config, work, parent, experiment, register_models, trained=out, mlflow_run_id=run_id,
                return_state=True))
    runs, failed = [], []
    for category, outcome in outcomes.items():
        if isinstance(outcome, Exception):
            failed.append(category)
            logger.error(f"category {category} failed: {outcome}")
        else:
            runs.append(CategoryRun.model_validate(outcome))  # a result read back from storage is JSON
    log_results_table(work, parent, runs)
    publish_benchmark(runs, failed, parent, tracking_uri(work))
    error = f"{len(failed)} of {len(categories)} categories failed: {', '.join(failed)}" if failed else None
    end_run(work, parent, "FAILED" if failed else "FINISHED", error=error)
    if error:
        raise RuntimeError(error)
    return runs


def evaluate_champion(champion: Champion, canary: FetchResult, category: str, work_dir: str) -> MetricsResult:
    """Re-score the champion on today's canary set with its own settings (stages keyed on its model bytes)."""
    champion_test = submit_features(canary, champion.config, work_dir, "test")
    champion_scores = submit_scores(champion.model, champion_test, canary, work_dir)
    return compute_metrics(champion_scores.result(), canary, champion.model, work_dir,
                           title=f"{category} champion v{champion.version}")


@flow(name="retrain-category", flow_run_name="retrain-{category}", result_serializer="json",
      task_runner=task_runner())
def retrain_category(
    data_url: str, canary_url: str, category: str, config: DetectorParams, work_dir: str, parent_run_id: str,
    experiment: str = RETRAIN_EXPERIMENT, metric: str = "image_auroc", min_delta: float = 0.0,
    trained: TrainedAndEvaluated | None = None, mlflow_run_id: str | None = None,
) -> PromotionDecision:
    """Train (unless the parent already did: `trained`), evaluate on the canary set, register as challenger;
    promote to champion unless it is worse.

    The promotion is a compare-and-set: the champion is re-scored outside the lock (the slow part), then inside
    `promotion_lock` the champion is read again and, if another run moved it meanwhile, the new champion is
    re-scored on the same canary set before the decision; the alias moves before the lock is released.
    """
    logger = get_run_logger()
    name = registered_model_name(category)
    with tracked_run(work_dir, experiment, category, run_id=mlflow_run_id, parent_run_id=parent_run_id,
                     tags=category_tags(category, canary_url)) as run_id:
        out = trained or train_and_evaluate(data_url, canary_url, category, config, work_dir)
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


@flow(name="nightly-retrain", result_serializer="json", task_runner=task_runner())
def nightly_retrain(
    data_url: str, product_line: str = "default", categories: list[str] | None = None,
    canary_url: str | None = None, config: DetectorParams | None = None, work_dir: str | None = None,
    experiment: str = RETRAIN_EXPERIMENT, metric: str = "image_auroc", min_delta: float = 0.0,
    category_deployment: str | None = None,
) -> list[PromotionDecision]:
    """Retrain a product line's categories and promote each challenger that is not worse than its champion.

    The categories train at once on the task runner, then each is promoted in its `retrain-category` subflow;
    with `category_deployment` ("retrain-category/…"), each category is a flow run of that deployment instead.
    A failed category fails the run at the end, after the others were promoted or kept.
    """
    logger = get_run_logger()
    config = config or DetectorParams()
    if config.method != "patchcore":
        raise ValueError(f"nightly-retrain registers PatchCore models only, not method={config.method!r}")
    work = str(get_settings().resolve_work_dir(work_dir))
    sweep_dead_runs_task(work)  # runs a killed process left RUNNING: FAILED (MLflow) and Crashed (Prefect)
    categories = categories or list_categories(data_url)
    canary = canary_url or data_url
    params = {"product_line": product_line, "data_url": data_url, "canary_url": canary, "categories": categories,
              "promotion_metric": metric, "min_delta": min_delta, **config.model_dump()}
    with tracked_run(work, experiment, f"nightly-retrain-{product_line}", params=params,
                     tags={"product_line": product_line}) as parent:
        if category_deployment:
            outcomes = run_category_deployments(category_deployment, categories, lambda c: {
                "data_url": data_url, "canary_url": canary, "category": c, "config": config.model_dump(),
                "work_dir": work, "parent_run_id": parent, "experiment": experiment, "metric": metric,
                "min_delta": min_delta})
        else:
            outcomes = run_categories_here(
                data_url, canary, categories, config, work, parent, experiment, lambda c: category_tags(c, canary),
                lambda c, out, run_id: retrain_category.with_options(task_runner=ONE_THREAD)(
                    data_url, canary, c, config, work, parent, experiment, metric, min_delta, trained=out,
                    mlflow_run_id=run_id, return_state=True))
        decisions = [PromotionDecision.model_validate(o) for o in outcomes.values() if not isinstance(o, Exception)]
        failed = [c for c, o in outcomes.items() if isinstance(o, Exception)]
        for category in failed:
            logger.error(f"category {category} failed: {outcomes[category]}")
        publish_promotions(decisions, product_line)
        if failed:
            raise RuntimeError(f"{len(failed)} of {len(categories)} categories failed: {', '.join(failed)}")
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
    dask_address: str | None = None,
    dask_workers: int | None = None,
    category_deployment: str | None = None,
) -> list[CategoryRun] | list[PromotionDecision] | str | dict:
    """PatchCore batch pipeline. `full-benchmark`: every category (or `categories`) of `data_url`, with the
    results table. `nightly-retrain`: the product line's `categories`, champion/challenger promotion.
    `paper-report`: the SPADE / PaDiM / PatchCore tables and ablations (`report` overrides its settings).
    `score-batch`: every new image under `data_url` scored with the champion of the one category in
    `categories` (or `model_uri`), results under `results_url` (see flows/score_batch.py).

    Scale-out (full-benchmark and nightly-retrain): `dask_address` runs the stages on that Dask scheduler,
    `dask_workers` on a local Dask cluster of that many processes (default: PATCHCORE_DASK_ADDRESS /
    PATCHCORE_DASK_WORKERS, else one thread); `category_deployment` makes each category a flow run of that
    deployment ("benchmark-category/…" or "retrain-category/…"), so a work pool spreads them over its workers.
    """
    runner = {"task_runner": task_runner(dask_address, dask_workers)} if dask_address or dask_workers else {}
    if mode == "full-benchmark":
        return full_benchmark.with_options(**runner)(data_url, categories, config, work_dir,
                                                     category_deployment=category_deployment)
    if mode == "paper-report":
        return paper_report(data_url, categories, work_dir, report)
    if mode == "score-batch":
        from flows.score_batch import score_batch

        if not results_url or (model_uri is None and len(categories or []) != 1):
            raise ValueError("mode score-batch needs results_url, and one category in categories or a model_uri")
        return score_batch(data_url, results_url, category=(categories or [None])[0], model_uri=model_uri,
                           shard_size=shard_size, work_dir=work_dir)
    return nightly_retrain.with_options(**runner)(data_url, product_line, categories, canary_url, config, work_dir,
                                                  metric=promotion_metric, min_delta=min_delta,
                                                  category_deployment=category_deployment)
