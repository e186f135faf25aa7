"""Model registry tasks: aliases (`challenger`, `champion`), the current champion, and the promotion rule."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import task
from pydantic import BaseModel

from patchcore_core.artifacts import CONFIG_FILE, MODEL_FILES
from patchcore_core.config import DetectorParams
from patchcore_core.stages.index import ModelResult
from patchcore_core.stages.metrics import MetricsResult
from tasks.tracking import MLFLOW_TASK, client_for

CHAMPION, CHALLENGER = "champion", "challenger"


class Champion(BaseModel):
    """The registered model version behind the `champion` alias, downloaded as a PatchCore model folder."""

    name: str
    version: str
    run_id: str | None
    config: DetectorParams
    model: ModelResult


class PromotionDecision(BaseModel):
    """Whether the challenger replaces the champion, with the rule and both figures on the same canary set."""

    registered_model: str
    promote: bool
    rule: str
    metric: str
    min_delta: float
    challenger_version: str
    challenger_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    reason: str


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such registered model, or no such alias
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@task(name="registry-current-champion", **MLFLOW_TASK)
def current_champion(work_dir: str, name: str, category: str) -> Champion | None:
    """The `champion` version of `name` (None when there is none), with its model folder downloaded locally."""
    client = client_for(work_dir)
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    target = Path(work_dir) / "champions" / name / f"v{version.version}"
    model_dir = target / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        download = target / "download"
        shutil.rmtree(download, ignore_errors=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                         dst_path=str(download)))
        tmp = target / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for file in MODEL_FILES:
            shutil.copy2(local / "artifacts" / file, tmp / file)
        tmp.rename(model_dir)
        shutil.rmtree(download, ignore_errors=True)
    config = DetectorParams.from_estimator_params(json.loads((model_dir / CONFIG_FILE).read_text())["params"])
    model = ModelResult(category=category, model_dir=str(model_dir), fingerprint=f"registry:{name}/{version.version}",
                        params=config.model_dump())
    return Champion(name=name, version=str(version.version), run_id=version.run_id, config=config, model=model)


def decide(
    name: str, challenger: MetricsResult, challenger_version: str, champion: MetricsResult | None,
    champion_version: str | None, metric: str = "image_auroc", min_delta: float = 0.0,
) -> PromotionDecision:
    """Promote when there is no champion, or when challenger[metric] >= champion[metric] + min_delta.

    min_delta = 0 means "not worse"; a negative value tolerates a small regression, a positive one demands a
    gain. Both figures come from the same canary test set.
    """
    rule = f"promote if {metric}(challenger) >= {metric}(champion) + {min_delta:g} on the canary test set"
    value = challenger.metrics.get(metric)
    if value is None:
        raise ValueError(f"metric {metric!r} is not among the evaluation metrics {sorted(challenger.metrics)}")
    if champion is None:
        return PromotionDecision(registered_model=name, promote=True, rule=rule, metric=metric, min_delta=min_delta,
                                 challenger_version=challenger_version, challenger_value=float(value),
                                 reason="no current champion")
    champ_value = float(champion.metrics[metric])
    promote = float(value) >= champ_value + min_delta
    reason = (f"challenger {value:.4f} {'>=' if promote else '<'} champion {champ_value:.4f} + {min_delta:g}")
    return PromotionDecision(registered_model=name, promote=promote, rule=rule, metric=metric, min_delta=min_delta,
                             challenger_version=challenger_version, challenger_value=float(value),
                             champion_version=champion_version, champion_value=champ_value, reason=reason)


@task(name="registry-decide-promotion", **MLFLOW_TASK)
def decide_promotion(
    name: str, challenger: MetricsResult, challenger_version: str, champion: MetricsResult | None,
    champion_version: str | None, metric: str = "image_auroc", min_delta: float = 0.0,
) -> PromotionDecision:
    return decide(name, challenger, challenger_version, champion, champion_version, metric, min_delta)


@task(name="registry-set-alias", **MLFLOW_TASK)
def set_alias(work_dir: str, name: str, alias: str, version: str) -> None:
    client_for(work_dir).set_registered_model_alias(name, alias, version)


@task(name="mlflow-log-promotion", **MLFLOW_TASK)
def log_promotion(work_dir: str, run_id: str, decision: PromotionDecision) -> None:
    """Log the rule, both figures and the outcome to the challenger's run and as version tags."""
    client = client_for(work_dir)
    client.log_param(run_id, "promotion.rule", decision.rule)
    client.log_metric(run_id, f"promotion.challenger_{decision.metric}", decision.challenger_value)
    if decision.champion_value is not None:
        client.log_metric(run_id, f"promotion.champion_{decision.metric}", decision.champion_value)
    client.set_tag(run_id, "promotion.promoted", str(decision.promote).lower())
    client.set_tag(run_id, "promotion.reason", decision.reason)
    client.log_dict(run_id, decision.model_dump(), "promotion/decision.json")
    client.set_model_version_tag(decision.registered_model, decision.challenger_version, "promotion",
                                 "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(decision.registered_model, decision.challenger_version, "promotion_reason",
                                 decision.reason)
