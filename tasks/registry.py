"""Model registry tasks: aliases (`challenger`, `champion`), the current champion, and the promotion rule.

Promotion is a compare-and-set: `promotion_lock(name)` (a Prefect global concurrency limit of one slot per
registered model, on the Prefect server every worker shares) lets one promotion of a model run at a time, and
inside it the flow re-reads the champion; if it moved since the challenger was compared, the challenger is
compared again with the new champion on the same canary set before the alias moves.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from datetime import UTC, datetime
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
from tasks.locks import PROMOTION_LOCK_TIMEOUT_S, promotion_lock, promotion_lock_name  # noqa: F401 - re-exported
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
    decided_at: str = ""  # UTC time the decision was taken, inside the promotion lock
    recompared: bool = False  # the champion moved while the challenger was evaluated: compared again in the lock

    def summary(self) -> str:
        verdict = "promote" if self.promote else "keep the champion"
        champion = f"v{self.champion_version}" if self.champion_version else "none"
        return (f"promotion of {self.registered_model}: {verdict} (challenger v{self.challenger_version}, champion "
                f"{champion}; {self.reason}; rule: {self.rule})")


def _alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:  # no such registered model, or no such alias
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


@task(name="registry-champion-version", **MLFLOW_TASK)
def champion_version(work_dir: str, name: str) -> str | None:
    """The version behind `champion` now (None when there is none): what the promotion compares against."""
    version = _alias_version(client_for(work_dir), name, CHAMPION)
    return None if version is None else str(version.version)


@task(name="registry-current-champion", **MLFLOW_TASK)
def current_champion(work_dir: str, name: str, category: str) -> Champion | None:
    """The `champion` version of `name` (None when there is none), with its model folder downloaded locally."""
    client = client_for(work_dir)
    version = _alias_version(client, name, CHAMPION)
    if version is None:
        return None
    # Keyed on the version's run too: a version number names another model once a registry is recreated, or
    # when one work dir serves two tracking servers.
    target = Path(work_dir) / "champions" / name / f"v{version.version}-{(version.run_id or 'norun')[:12]}"
    model_dir = target / "model"
    if not (model_dir / CONFIG_FILE).is_file():
        # A private temporary folder per download: two runs fetching the same champion never share one.
        target.mkdir(parents=True, exist_ok=True)
        download = Path(tempfile.mkdtemp(prefix=".download-", suffix=".tmp", dir=target))
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}",
                                                             dst_path=str(download / "files")))
            tmp = download / "model"
            tmp.mkdir()
            for file in MODEL_FILES:
                shutil.copy2(local / "artifacts" / file, tmp / file)
            try:
                tmp.rename(model_dir)
            except OSError:  # another run put the same version there first
                if not (model_dir / CONFIG_FILE).is_file():
                    raise
        finally:
            shutil.rmtree(download, ignore_errors=True)
    config = DetectorParams.from_estimator_params(json.loads((model_dir / CONFIG_FILE).read_text())["params"])
    model = ModelResult(category=category, model_dir=str(model_dir), fingerprint=f"registry:{name}/{version.version}",
                        params=config.model_dump())
    return Champion(name=name, version=str(version.version), run_id=version.run_id, config=config, model=model)


def decide(
    name: str, challenger: MetricsResult, challenger_version: str, champion: MetricsResult | None,
    champion_version: str | None, metric: str = "image_auroc", min_delta: float = 0.0,
) -> PromotionDecision:
    """Promote when the challenger's false-positive rate at its own calibrated threshold on the canary set is
    within its target (`calibration.fpr_within_target`: not significantly above it), AND there is no champion
    or challenger[metric] >= champion[metric] + min_delta on the same canary set.

    min_delta = 0 means "not worse"; a negative value tolerates a small regression, a positive one demands a
    gain. The operating point is checked even without a champion: a model that flags far more good parts than
    its target never becomes champion.
    """
    from patchcore_core.calibration import fpr_within_target

    rule = (f"promote if the challenger's canary FPR at its calibrated threshold is within its target (one-sided "
            f"binomial test, 5 %) and {metric}(challenger) >= {metric}(champion) + {min_delta:g} on the canary "
            "test set")
    value = challenger.metrics.get(metric)
    if value is None:
        raise ValueError(f"metric {metric!r} is not among the evaluation metrics {sorted(challenger.metrics)}")
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    fpr_ok, fpr_reason = fpr_within_target(challenger.metrics.get("operating_point"))
    common = dict(registered_model=name, rule=rule, metric=metric, min_delta=min_delta,
                  challenger_version=challenger_version, challenger_value=float(value), decided_at=now)
    if champion is None:
        reason = "no current champion; " + fpr_reason
        return PromotionDecision(promote=fpr_ok, reason=reason, **common)
    champ_value = float(champion.metrics[metric])
    if champion_version == challenger_version:  # the same model fingerprint: the registry reused the version
        promote, reason = False, "the challenger is already the champion (same model fingerprint)"
    else:
        better = float(value) >= champ_value + min_delta
        promote = better and fpr_ok
        reason = (f"challenger {value:.4f} {'>=' if better else '<'} champion {champ_value:.4f} + {min_delta:g}; "
                  + fpr_reason)
    return PromotionDecision(promote=promote, reason=reason, champion_version=champion_version,
                             champion_value=champ_value, **common)


@task(name="registry-decide-promotion", **MLFLOW_TASK)
def decide_promotion(
    name: str, challenger: MetricsResult, challenger_version: str, champion: MetricsResult | None,
    champion_version: str | None, metric: str = "image_auroc", min_delta: float = 0.0,
) -> PromotionDecision:
    return decide(name, challenger, challenger_version, champion, champion_version, metric, min_delta)


@task(name="registry-set-alias", **MLFLOW_TASK)
def set_alias(work_dir: str, name: str, alias: str, version: str) -> None:
    client_for(work_dir).set_registered_model_alias(name, alias, version)


COMPARISON_HEADING = "**Against the champion"


def comparison_markdown(decision: PromotionDecision, challenger: dict, champion: dict | None) -> str:
    """The challenger beside the champion on the same canary set, and the decision, for the version page."""
    from tasks.tracking import DESCRIBED_METRICS, _fmt

    if champion is None:
        return (f"{COMPARISON_HEADING}**: there was no champion; this version was promoted "
                f"({decision.decided_at}).")
    rows = [f"| {label} | {_fmt(challenger.get(key))} | {_fmt(champion.get(key))} |"
            for key, label in DESCRIBED_METRICS.items() if key in challenger]
    verdict = "**promoted to champion**" if decision.promote else "**not promoted**"
    return "\n".join([
        f"{COMPARISON_HEADING} v{decision.champion_version} on the same canary set** ({decision.decided_at}):",
        "", f"| metric | v{decision.challenger_version} (challenger) | v{decision.champion_version} (champion) |",
        "|---|---|---|", *rows, "",
        f"{verdict}: {decision.reason}. Rule: {decision.rule}.",
    ])


@task(name="mlflow-log-promotion", **MLFLOW_TASK)
def log_promotion(work_dir: str, run_id: str, decision: PromotionDecision, challenger_metrics: dict | None = None,
                  champion_metrics: dict | None = None) -> None:
    """Log the rule, both figures and the outcome to the challenger's run, as version tags, and the comparison
    with the champion in the version's description (what a person reads before promoting by hand)."""
    client = client_for(work_dir)
    client.log_param(run_id, "promotion.rule", decision.rule)
    client.log_metric(run_id, f"promotion.challenger_{decision.metric}", decision.challenger_value)
    if decision.champion_value is not None:
        client.log_metric(run_id, f"promotion.champion_{decision.metric}", decision.champion_value)
    client.set_tag(run_id, "promotion.promoted", str(decision.promote).lower())
    client.set_tag(run_id, "promotion.reason", decision.reason)
    client.log_dict(run_id, decision.model_dump(), "promotion/decision.json")
    if decision.challenger_version == decision.champion_version:
        return  # the champion's own tags stay as they are
    if challenger_metrics is not None:
        version = client.get_model_version(decision.registered_model, decision.challenger_version)
        base = (version.description or "").split("\n\n" + COMPARISON_HEADING)[0]
        client.update_model_version(decision.registered_model, decision.challenger_version, description=(
            base + "\n\n" + comparison_markdown(decision, challenger_metrics, champion_metrics)))
    client.set_model_version_tag(decision.registered_model, decision.challenger_version, "promotion",
                                 "promoted" if decision.promote else "rejected")
    client.set_model_version_tag(decision.registered_model, decision.challenger_version, "promotion_reason",
                                 decision.reason)
