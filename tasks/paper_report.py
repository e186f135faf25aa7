"""The paper-style report as Prefect tasks: run the experiment grid, then publish it to MLflow and Prefect."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from experiments.paper_report import run_paper_report
from tasks.reporting import artifact_key
from tasks.settings import get_settings
from tasks.tracking import client_for, end_run, start_run

REPORT_EXPERIMENT = "patchcore-paper-report"


@task(name="paper-report-grid", cache_policy=NO_CACHE)
def run_report_grid(data_url: str, categories: list[str] | None, out_dir: str, settings: dict[str, Any]) -> dict:
    """Run SPADE, PaDiM and PatchCore variants and the ablations; return the report, figure and table paths."""
    result = run_paper_report(data_url, categories, out_dir, storage_options=get_settings().storage_options(data_url),
                              **settings)
    tables = result.write_tables(Path(out_dir) / "tables")
    return {
        "report": str(result.report_path),
        "figures": [str(p) for p in result.figure_paths],
        "tables": [str(p) for p in tables],
        "wall_seconds": result.wall_seconds,
        "device": result.device,
        "acceptance": result.acceptance,
        "image_auroc_rows": result.tables["image_auroc"].to_dict(orient="records"),
    }


@task(name="publish-paper-report", cache_policy=NO_CACHE)
def publish_report(report: dict, work_dir: str, params: dict[str, Any]) -> str:
    """Log the report, its tables and figures to an MLflow run; the same Markdown and table as Prefect artifacts."""
    run_id = start_run.fn(work_dir, REPORT_EXPERIMENT, "paper-report", params=params)
    client = client_for(work_dir)
    client.log_artifact(run_id, report["report"])
    for path in report["tables"]:
        client.log_artifact(run_id, path, artifact_path="tables")
    for path in report["figures"]:
        client.log_artifact(run_id, path, artifact_path="figures")
    client.log_metric(run_id, "wall_seconds", float(report["wall_seconds"]))
    client.set_tag(run_id, "device", report["device"])
    end_run.fn(work_dir, run_id)
    create_markdown_artifact(markdown=Path(report["report"]).read_text(), key=artifact_key("patchcore-paper-report"),
                             description="SPADE / PaDiM / PatchCore tables, ablations and timings")
    create_table_artifact(table=report["image_auroc_rows"], key=artifact_key("patchcore-paper-report-image-auroc"),
                          description="image AUROC per category and method (Table 1 / S1 layout)")
    return run_id
