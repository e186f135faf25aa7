"""The `patchcore/paper-report` mode: the report grid runs as a flow and lands in MLflow and Prefect artifacts."""

from __future__ import annotations

import mlflow
import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")

TINY = dict(image_size=48, resize=56, coreset_ratios=[0.5, 0.1], heatmap_ratio=0.1, ablation_ratio=0.1,
            lowshot_sizes=[1, 3], image_sizes=[48], layer_sets=[[2, 3]], patch_sizes=[3], timing_images=2,
            spade_k=3, device="cpu", batch_size=4, backbone="efficientnet_lite0")


def test_paper_report_mode_logs_report_tables_and_figures(pipeline_env, pipeline_dataset):
    from test_flows import artifact_keys

    from flows.patchcore import patchcore

    run_id = patchcore(mode="paper-report", data_url=str(pipeline_dataset), categories=["brick"],
                       work_dir=str(pipeline_env["work_dir"]), report=TINY)
    client = mlflow.MlflowClient(tracking_uri=pipeline_env["tracking_uri"], registry_uri=pipeline_env["tracking_uri"])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["wall_seconds"] > 0
    logged = {a.path for a in client.list_artifacts(run_id)}
    assert {"paper_report.md", "tables", "figures"} <= logged
    tables = {a.path for a in client.list_artifacts(run_id, "tables")}
    assert "tables/image_auroc.csv" in tables
    assert artifact_keys(["patchcore-paper-report", "patchcore-paper-report-image-auroc"]) == {
        "patchcore-paper-report", "patchcore-paper-report-image-auroc"}
