"""Prefect artifacts: the benchmark results table (Markdown + table) and the promotion decisions."""

from __future__ import annotations

import math
import re

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from tasks.registry import PromotionDecision
from tasks.tracking import CategoryRun, markdown_table, results_table


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-") or "patchcore"


def _cell(value):
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


@task(name="publish-benchmark-results", cache_policy=NO_CACHE)
def publish_benchmark(runs: list[CategoryRun], failed: list[str], mlflow_parent_run_id: str, tracking_uri: str,
                      key: str = "patchcore-full-benchmark") -> str:
    """Markdown and table artifacts with per-category image AUROC, pixel AUROC, AU-PRO and the mean."""
    table = results_table(runs)
    markdown = "\n".join([
        "# PatchCore full benchmark",
        "",
        markdown_table(table),
        "",
        *(["**Failed categories:** " + ", ".join(failed), ""] if failed else []),
        f"MLflow parent run `{mlflow_parent_run_id}` in `{tracking_uri}`.",
    ])
    create_markdown_artifact(markdown=markdown, key=artifact_key(key), description="Table S1-S3 layout")
    create_table_artifact(
        table=[{k: _cell(v) for k, v in row.items()} for row in table.to_dict(orient="records")],
        key=artifact_key(f"{key}-table"),
        description="per-category image AUROC, pixel AUROC, AU-PRO and their mean",
    )
    return markdown


@task(name="publish-promotions", cache_policy=NO_CACHE)
def publish_promotions(decisions: list[PromotionDecision], product_line: str) -> str:
    rows = [d.model_dump(include={"registered_model", "promote", "metric", "challenger_version",
                                  "challenger_value", "champion_version", "champion_value", "reason",
                                  "recompared", "decided_at"})
            for d in decisions]
    lines = [f"# Nightly retrain: {product_line}", ""]
    for d in decisions:
        verdict = "promoted to champion" if d.promote else "kept the current champion"
        lines.append(f"- `{d.registered_model}` v{d.challenger_version}: **{verdict}** ({d.reason})")
    lines += ["", f"Rule: {decisions[0].rule}" if decisions else "No category was retrained."]
    markdown = "\n".join(lines)
    create_markdown_artifact(markdown=markdown, key=artifact_key(f"patchcore-retrain-{product_line}"))
    if rows:
        create_table_artifact(table=rows, key=artifact_key(f"patchcore-retrain-{product_line}-table"))
    return markdown
