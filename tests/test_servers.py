"""The real set-up, as users start it: `prefect server start`, a process worker, `mlflow server`, SeaweedFS S3.

Every server is a subprocess on 127.0.0.1 (free ports, a temporary PREFECT_HOME, analytics off), stopped at the
end. Unlike the test harness these runs go through the server's scheduler and a worker, so they catch what
the harness cannot: a scheduler that creates no runs (SQLAlchemy 2.1 with Prefect 3.8), a deployment a worker
cannot start, a champion that never gets its alias.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OFFLINE_CONFIG = {"backbone": "efficientnet_lite0", "image_size": 64, "resize": 72, "coreset_ratio": 0.25,
                  "batch_size": 4}


def load_local_servers():
    from infra import local_servers

    return local_servers


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` with the process work pool and every deployment of prefect.yaml."""
    servers = load_local_servers()
    # A short scheduler loop so scheduled runs appear within seconds of `prefect deploy`.
    server = servers.PrefectServer(tmp_path_factory.mktemp("prefect-home"),
                                   extra_env={"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2"})
    server.start()
    try:
        server.cli("work-pool", "create", "patchcore-process", "--type", "process")
        server.cli("deploy", "--all", cwd=REPO)
        yield server
    finally:
        server.stop()


def _client(server):
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    class _Client:
        def __enter__(self):
            self._settings = temporary_settings({PREFECT_API_URL: server.url})
            self._settings.__enter__()
            self._client = get_client(sync_client=True)
            return self._client.__enter__()

        def __exit__(self, *exc):
            self._client.__exit__(*exc)
            self._settings.__exit__(*exc)

    return _Client()


def test_scheduler_creates_runs_for_every_nightly_schedule(prefect_server):
    """A fresh install's scheduler creates the nightly runs (it creates none with SQLAlchemy 2.1)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    [nightly] = [d for d in spec["deployments"] if d["name"] == "nightly-retrain"]
    expected = {s["slug"]: s["parameters"]["product_line"] for s in nightly["schedules"]}
    assert len(expected) == 3

    found: dict[str, set[str]] = {}
    deadline = time.monotonic() + 90
    with _client(prefect_server) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["nightly-retrain"])), limit=200)
            found = {}
            for run in runs:
                if run.state and run.state.is_scheduled() and run.created_by is not None:
                    found.setdefault(run.created_by.display_value, set()).add(run.parameters.get("product_line"))
            if set(found) >= set(expected):
                break
            time.sleep(2)
    assert {slug: lines for slug, lines in found.items()} == {slug: {line} for slug, line in expected.items()}, (
        f"scheduled runs by schedule: {found}\n{prefect_server.tail()}")


def test_worker_runs_the_nightly_retrain_deployment(prefect_server, s3_server, s3_dataset, tmp_path):
    """`prefect deployment run patchcore/nightly-retrain` picked up by `prefect worker start`, against
    SeaweedFS S3 and `mlflow server`: the run completes and the category has a champion. The second run fans its
    category out to patchcore/retrain-category (`category_deployment`), as a product line with many would."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    servers = load_local_servers()
    mlflow_server = servers.MlflowServer(tmp_path / "mlflow").start()
    work = tmp_path / "work"
    worker_env = {**prefect_server.client_env, **s3_server.env, "MLFLOW_TRACKING_URI": mlflow_server.url,
                  "PATCHCORE_WORK_DIR": str(work), "PATCHCORE_THREADS": "1", "PATCHCORE_DEVICE": "cpu",
                  "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                  "PATH": f"{servers.BIN}:{prefect_server.client_env.get('PATH', '')}"}
    for quiet in ("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "TQDM_DISABLE"):  # the pipeline's own defaults apply
        worker_env.pop(quiet, None)
    worker = servers.Process([str(servers.BIN / "prefect"), "worker", "start", "--pool", "patchcore-process",
                              "--limit", "2"], tmp_path / "worker.log", env=worker_env, cwd=REPO)
    started = time.monotonic()
    try:
        worker.start()
        # v1 in the parent's process, then v2 against v1 in a flow run of its own
        per_category = ["-p", "category_deployment=retrain-category/retrain-category"]
        for config, fan_out in ((OFFLINE_CONFIG, []), ({**OFFLINE_CONFIG, "coreset_ratio": 0.5}, per_category)):
            done = prefect_server.cli(
                "deployment", "run", "patchcore/nightly-retrain", "-p", f"data_url={s3_dataset}",
                "-p", 'categories=["brick"]', "-p", "product_line=test-line", "-p", f"config={json.dumps(config)}",
                *fan_out, "--watch", "--watch-timeout", "600", timeout=660)
            assert "Completed" in done.stdout, done.stdout[-3000:] + worker.tail(80)
        elapsed = time.monotonic() - started
        with _client(prefect_server) as client:
            [child] = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["retrain-category"])))
        assert child.state.is_completed() and child.parent_task_run_id is not None
        assert child.parameters["category"] == "brick"
    finally:
        worker.stop()
        log = worker.tail(400)
        mlflow_server.stop()
    print(f"worker start and two runs took {elapsed:.0f}s")
    # Each decision, at INFO, in the worker's log; the second against the first's champion (downloaded).
    decisions = [line for line in log.splitlines() if "promotion of patchcore-brick:" in line]
    assert len(decisions) == 2 and "champion none" in decisions[0] and "champion v1" in decisions[1], log[-4000:]
    noise = [line for line in log.splitlines() if any(n in line for n in (
        "Downloading artifacts", "UserWarning", "shadows an attribute", "Failed to send telemetry", "Traceback"))]
    assert not noise, "\n".join(noise[:20])

    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    registry = MlflowClient(store, store)
    champion = registry.get_model_version_by_alias("patchcore-brick", "champion")
    assert champion.tags["promotion"] == "promoted"
    assert {str(v.version) for v in registry.search_model_versions("name = 'patchcore-brick'")} == {"1", "2"}
    run = registry.get_run(champion.run_id)
    assert run.info.status == "FINISHED" and run.data.params["backbone"] == "efficientnet_lite0"


def test_categories_run_as_separate_flow_runs_on_the_pool(prefect_server, s3_server, s3_dataset, tmp_path):
    """full-benchmark with `category_deployment`: each category is a flow run of patchcore/benchmark-category
    that the worker starts in its own process, in parallel (limit 3: the parent and both categories); the parent
    collects the results table."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    servers = load_local_servers()
    mlflow_server = servers.MlflowServer(tmp_path / "mlflow").start()
    worker_env = {**prefect_server.client_env, **s3_server.env, "MLFLOW_TRACKING_URI": mlflow_server.url,
                  "PATCHCORE_WORK_DIR": str(tmp_path / "work"), "PATCHCORE_THREADS": "1",
                  "PATCHCORE_DEVICE": "cpu", "PREFECT_WORKER_QUERY_SECONDS": "2", "OMP_WAIT_POLICY": "PASSIVE",
                  "PATH": f"{servers.BIN}:{prefect_server.client_env.get('PATH', '')}"}
    worker = servers.Process([str(servers.BIN / "prefect"), "worker", "start", "--pool", "patchcore-process",
                              "--limit", "3"], tmp_path / "worker.log", env=worker_env, cwd=REPO)
    try:
        worker.start()
        done = prefect_server.cli(
            "deployment", "run", "patchcore/full-benchmark", "-p", f"data_url={s3_dataset}",
            "-p", f"config={json.dumps(OFFLINE_CONFIG)}",
            "-p", "category_deployment=benchmark-category/benchmark-category",
            "--watch", "--watch-timeout", "600", timeout=660)
        assert "Completed" in done.stdout, done.stdout[-3000:] + worker.tail(80)
        with _client(prefect_server) as client:
            children = client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["benchmark-category"])))
    finally:
        worker.stop()
        mlflow_server.stop()
    assert sorted(r.parameters["category"] for r in children) == ["brick", "gravel"]
    assert all(r.state.is_completed() and r.parent_task_run_id is not None for r in children)
    first, second = sorted(children, key=lambda r: r.start_time)
    assert second.start_time < first.end_time, "the two categories did not run at the same time"

    store = f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(store, store)
    exp = client.get_experiment_by_name("patchcore-benchmark")
    [parent] = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'full-benchmark'")
    assert parent.info.status == "FINISHED" and "mean_image_auroc" in parent.data.metrics
    nested = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in nested) == ["brick", "gravel"]
    assert {r.data.tags["prefect.flow_run_id"] for r in nested} == {str(r.id) for r in children}
