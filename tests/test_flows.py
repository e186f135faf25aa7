"""The Prefect flows for real: test harness, SeaweedFS S3 on loopback, SQLite MLflow, small generated images.

Covers `patchcore/full-benchmark` end to end (nested MLflow runs, registered models, results tables, Prefect
artifacts, reruns that reuse stage outputs), a run killed after extraction that resumes from its shards,
`nightly-retrain` champion/challenger promotion with `mlflow models serve` answering a scoring request, and
`prefect deploy`.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from infra.local_servers import free_port, stop_group, wait_http
from patchcore_core.config import DetectorParams

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONFIG = DetectorParams(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4)
STAGES = {"fetch", "extract", "coreset", "index", "score", "metrics"}

pytestmark = pytest.mark.usefixtures("prefect_harness")


def reference_scores(data_root: Path, category: str) -> np.ndarray:
    """PatchCore.fit/predict on the same images and settings, outside any pipeline."""
    from patchcore_core.baselines import make_detector
    from patchcore_core.data import list_category
    from patchcore_core.runtime import configure_threads

    configure_threads()  # this thread's OpenMP count = PATCHCORE_THREADS, as in the pipeline's task threads
    listing = list_category(str(data_root), category)
    model = make_detector("patchcore", strict=False, **CONFIG.estimator_params(), device="cpu", progress=False)
    model.fit([s.path for s in listing.train])
    return model.predict([s.path for s in listing.test])[0]


def stage_states(flow_run_id) -> dict[str, str]:
    """{task run name: state name} of the stage tasks of a flow run and all its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort, TaskRunSort

    def task_runs(client, flow_run_ids):
        return client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(
            any_=flow_run_ids)), limit=200, offset=0, sort=TaskRunSort.EXPECTED_START_TIME_ASC)

    with get_client(sync_client=True) as client:
        ids, frontier = [flow_run_id], [flow_run_id]
        while frontier:  # a subflow run's parent_task_run_id is a task run of its parent flow run
            parents = [t.id for t in task_runs(client, frontier)]
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=parents)),
                limit=200, offset=0, sort=FlowRunSort.ID_DESC,
            ) if parents else []
            frontier = [c.id for c in children if c.id not in ids]
            ids += frontier
        runs = task_runs(client, ids)
    return {r.name: r.state.name for r in runs if r.name.split("-")[0] in STAGES}


def file_stamps(*folders: Path) -> dict[Path, tuple[int, int]]:
    """{file: (inode, mtime)} of every file under the folders: unchanged stamps mean nothing was rewritten."""
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}


def artifact_keys(keys: list[str]) -> set[str]:
    """Which of `keys` name a Prefect artifact."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)), flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(), limit=200, offset=0, sort=ArtifactSort.CREATED_DESC,
        )
    return {a.key for a in found}


# ---------------------------------------------------------------------------------------------- full benchmark


def test_full_benchmark_end_to_end(pipeline_env, s3_dataset):
    from mlflow import MlflowClient

    from flows.patchcore import patchcore

    work = str(pipeline_env["work_dir"])
    state = patchcore(mode="full-benchmark", data_url=s3_dataset, config=CONFIG, work_dir=work, return_state=True)
    assert state.is_completed(), state.message
    runs = state.result()
    assert [r.category for r in runs] == ["brick", "gravel"]  # every category found under the URL

    # The pipeline's scores equal PatchCore.fit/predict on the same images and settings.
    for run in runs:
        preds = pd.read_parquet(run.scores.predictions)
        np.testing.assert_array_equal(preds["score"].to_numpy(), reference_scores(run.fetched.root, run.category))
        assert {"image_auroc", "pixel_auroc", "au_pro"} <= set(run.evaluation.metrics)
        assert (Path(run.model.model_dir) / "index.faiss").is_file()

    client = MlflowClient(pipeline_env["tracking_uri"], pipeline_env["tracking_uri"])
    exp = client.get_experiment_by_name("patchcore-benchmark")
    assert exp.artifact_location.startswith(pipeline_env["tmp"].as_uri())  # beside the SQLite DB, not ./mlruns
    [parent] = client.search_runs([exp.experiment_id], "tags.mlflow.runName = 'full-benchmark'")
    assert parent.info.status == "FINISHED"
    assert {"mean_image_auroc", "mean_pixel_auroc", "mean_au_pro"} <= set(parent.data.metrics)
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(c.data.tags["mlflow.runName"] for c in children) == ["brick", "gravel"]
    for child in children:
        assert {"image_auroc", "pixel_auroc", "au_pro", "f1", "error_at_full_recall"} <= set(child.data.metrics)
        assert child.data.params["backbone"] == "efficientnet_lite0" and child.info.status == "FINISHED"
        figures = {Path(a.path).name for a in client.list_artifacts(child.info.run_id, "figures")}
        assert figures == {"roc_pr.png", "pro_curve.png", "overlays_worst.png", "overlays_best.png"}
    table_path = client.download_artifacts(parent.info.run_id, "results/table_s1_s3.json")
    table = json.loads(Path(table_path).read_text())
    assert table["columns"] == ["category", "image AUROC", "pixel AUROC", "AU-PRO"]
    assert [row[0] for row in table["data"]] == ["brick", "gravel", "mean"]
    for name in ("patchcore-brick", "patchcore-gravel"):
        version = client.get_model_version(name, "1")
        assert version.run_id in {c.info.run_id for c in children}
    keys = ["patchcore-full-benchmark", "patchcore-full-benchmark-table"]
    assert artifact_keys(keys) == set(keys)

    # A rerun with the same inputs and library version rewrites nothing: every stage returns its stored result.
    outputs = [Path(work) / "features", Path(work) / "stages" / "brick"]
    before = file_stamps(*outputs)
    again = patchcore(mode="full-benchmark", data_url=s3_dataset, categories=["brick"], config=CONFIG,
                      work_dir=work, return_state=True)
    assert again.is_completed(), again.message
    states = stage_states(again.state_details.flow_run_id)
    # fetch, extract (a part task per shard + the split's), coreset, index, score (a part + the merge), metrics
    assert len(states) == 10 and set(states.values()) == {"Completed"}, states
    assert file_stamps(*outputs) == before, "a rerun with unchanged inputs rewrote stage outputs"
    # The same model fingerprint registers no new version: version 1 gets the new run's tags.
    [rerun] = again.result()
    assert rerun.registered_version == "1"
    assert [str(v.version) for v in client.search_model_versions("name = 'patchcore-brick'")] == ["1"]
    brick_v1 = client.get_model_version("patchcore-brick", "1")
    assert brick_v1.tags["run_id"] == rerun.mlflow_run_id and rerun.mlflow_run_id in brick_v1.tags["runs"]
    assert len(brick_v1.tags["model_fingerprint"]) == 64
    assert client.get_run(rerun.mlflow_run_id).data.tags["registry.reused_version"] == "true"

    # One cache: deleting a stage's output makes the next run recompute that stage (and what reads it), no flags.
    [brick] = again.result()
    Path(brick.scores.predictions).unlink()
    third = patchcore(mode="full-benchmark", data_url=s3_dataset, categories=["brick"], config=CONFIG,
                      work_dir=work, return_state=True)
    assert third.is_completed(), third.message
    [redone] = third.result()
    assert Path(redone.scores.predictions).is_file()
    np.testing.assert_array_equal(pd.read_parquet(redone.scores.predictions)["score"].to_numpy(),
                                  reference_scores(redone.fetched.root, "brick"))
    changed = {p for p, stamp in file_stamps(*outputs).items() if before.get(p) != stamp}
    assert changed and all(p.parent.name.startswith("score-") for p in changed), sorted(changed)


# ---------------------------------------------------------------------------------------------- kill + resume

KILL_AFTER_EXTRACTION = """
import os, signal, sys
from prefect import task
import flows.patchcore as pipeline
from patchcore_core.config import DetectorParams

@task(name="coreset")
def killed_after_extraction(features, params, work_dir):
    os.kill(os.getpid(), signal.SIGKILL)  # as an OOM killer or a lost node would

pipeline.select_coreset = killed_after_extraction
pipeline.patchcore(mode="full-benchmark", data_url=sys.argv[1], categories=["brick"],
                   config=DetectorParams.model_validate_json(sys.argv[2]), work_dir=sys.argv[3])
"""


def test_killed_after_extraction_resumes_from_shards(pipeline_env, s3_dataset):
    from prefect.settings import PREFECT_API_URL

    from flows.patchcore import patchcore

    work = pipeline_env["work_dir"]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_EXTRACTION, s3_dataset, CONFIG.model_dump_json(),
                             str(work)], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    shards = sorted(work.glob("features/*/dataset=*/category=brick/split=*/part-*.parquet"))
    assert {p.parent.name for p in shards} == {"split=train", "split=test"}
    assert all((p.parent / "_SUCCESS.json").is_file() for p in shards)
    assert not list(work.glob("stages/brick/coreset-*")), "the kill came before the coreset stage"
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}

    state = patchcore(mode="full-benchmark", data_url=s3_dataset, categories=["brick"], config=CONFIG,
                      work_dir=str(work), return_state=True)
    assert state.is_completed(), state.message
    states = stage_states(state.state_details.flow_run_id)
    assert set(states.values()) == {"Completed"}, states
    after = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shards}
    assert after == before, "the rerun rewrote finished shards"
    [run] = state.result()
    preds = pd.read_parquet(run.scores.predictions)
    np.testing.assert_array_equal(preds["score"].to_numpy(), reference_scores(run.fetched.root, "brick"))


# ---------------------------------------------------------------------------------------------- nightly retrain


def second_digest(client, name: str) -> str:
    """The data digest tag of version 2, as MLflow's dataset digest (32 characters)."""
    return client.get_model_version(name, "2").tags["data_digest"][:32]


def test_nightly_retrain_promotes_only_if_not_worse_and_serves_champion(pipeline_env, s3_dataset):
    from mlflow import MlflowClient

    from flows.patchcore import patchcore

    work = str(pipeline_env["work_dir"])
    client = MlflowClient(pipeline_env["tracking_uri"], pipeline_env["tracking_uri"])
    name = "patchcore-gravel"

    [first] = patchcore(mode="nightly-retrain", data_url=s3_dataset, product_line="line-a", categories=["gravel"],
                        config=CONFIG, work_dir=work)
    assert first.promote and first.reason.startswith("no current champion") and first.challenger_version == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"

    # Same data and settings: the same model fingerprint, so no new version; v1 stays champion, untouched.
    [same] = patchcore(mode="nightly-retrain", data_url=s3_dataset, product_line="line-a", categories=["gravel"],
                       config=CONFIG, work_dir=work)
    assert (same.challenger_version, same.champion_version, same.promote) == ("1", "1", False), same
    assert same.champion_value == same.challenger_value  # both figures from the same canary set
    assert [str(v.version) for v in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert client.get_model_version(name, "1").tags["promotion"] == "promoted"

    # Another model (a larger coreset) and an impossible gain demanded: the challenger (v2) must not win.
    other = CONFIG.model_copy(update={"coreset_ratio": 0.5})
    [second] = patchcore(mode="nightly-retrain", data_url=s3_dataset, product_line="line-a",
                         categories=["gravel"], config=other, work_dir=work, min_delta=1.01)
    assert not second.promote and (second.challenger_version, second.champion_version) == ("2", "1")
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"
    # What a person reads in the MLflow UI before promoting by hand: metrics, operating point, settings, figure
    # links and the comparison with the champion on the same canary set; the data as "Datasets used".
    description = client.get_model_version(name, "2").description
    metrics = client.get_run(client.get_model_version(name, "2").run_id).data.metrics
    threshold = metrics["op_threshold"]  # the calibrated threshold (held-out train images), not the F1 oracle
    assert f"at least **{threshold:.4f}**" in description and "`coreset_ratio=0.5`" in description
    assert "never on test images" in description and {"op_fpr", "op_tpr", "op_pixel_fpr"} <= set(metrics)
    assert "/artifacts/figures/roc_pr.png)" in description
    assert "Against the champion v1 on the same canary set" in description and "**not promoted**" in description
    inputs = client.get_run(client.get_model_version(name, "2").run_id).inputs.dataset_inputs
    assert {(i.dataset.name, i.tags[0].value) for i in inputs} == {("gravel-train", "training"),
                                                                   ("gravel-test", "evaluation")}
    assert all(i.dataset.digest == second_digest(client, name) for i in inputs)
    run = client.get_run(client.get_model_version(name, "2").run_id)
    assert "image_auroc(challenger) >= image_auroc(champion)" in run.data.params["promotion.rule"]
    assert {"promotion.challenger_image_auroc", "promotion.champion_image_auroc"} <= set(run.data.metrics)
    assert run.data.tags["promotion.promoted"] == "false"
    assert client.get_model_version(name, "2").tags["promotion"] == "rejected"
    assert artifact_keys(["patchcore-retrain-line-a"]) == {"patchcore-retrain-line-a"}

    # `mlflow models serve` answers a real HTTP scoring request with the champion.
    cache = next((Path(work) / "data").iterdir()) / "gravel"
    images = [cache / "test" / "good" / "000.png", *sorted((cache / "test").glob("[!g]*/*.png"))[:1]]
    port = free_port()
    # as in an activated venv: the scoring server runs `uvicorn` from PATH
    env = dict(os.environ, MLFLOW_TRACKING_URI=pipeline_env["tracking_uri"], PATCHCORE_THREADS="1",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    log_path = pipeline_env["tmp"] / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}\n{log_path.read_text()[-4000:]}") from exc
        body = {"dataframe_split": {"columns": ["image"],
                                    "data": [[base64.b64encode(p.read_bytes()).decode()] for p in images]}}
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            predictions = json.loads(resp.read())["predictions"]
    finally:
        stop_group(proc)
    assert len(predictions) == 2 and {"score", "is_anomalous"} <= set(predictions[0])
    champion_run = client.get_model_version(name, "1").run_id  # its own evaluation, logged with the model
    champion_scores = pd.read_parquet(client.download_artifacts(champion_run, "evaluation/predictions.parquet",
                                                                str(pipeline_env["tmp"])))
    expected = champion_scores.set_index("relpath")["score"]
    for path, pred in zip(images, predictions, strict=True):
        rel = path.relative_to(cache).as_posix()
        assert pred["score"] == pytest.approx(float(expected[rel]), rel=1e-5)


# ---------------------------------------------------------------------------------------------- deployments


def test_prefect_yaml_deploys_both_deployments_with_schedules():
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value())
    prefect = str(BIN / "prefect")
    subprocess.run([prefect, "work-pool", "create", "patchcore-process", "--type", "process"], env=env, cwd=REPO,
                   check=True, capture_output=True, timeout=120)
    deployed = subprocess.run([prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    with get_client(sync_client=True) as client:
        bench = client.read_deployment_by_name("patchcore/full-benchmark")
        nightly = client.read_deployment_by_name("patchcore/nightly-retrain")
        report = client.read_deployment_by_name("patchcore/paper-report")
        scoring = client.read_deployment_by_name("patchcore/score-batch")
    assert scoring.parameters["mode"] == "score-batch" and scoring.parameters["categories"] == ["bottle"]
    assert bench.parameters["mode"] == "full-benchmark" and bench.work_pool_name == "patchcore-process"
    assert report.parameters["mode"] == "paper-report"
    assert bench.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    assert nightly.parameters["mode"] == "nightly-retrain"
    lines = {s.slug: s for s in nightly.schedules}
    assert set(lines) == {"line-textures", "line-containers", "line-hardware"}
    assert lines["line-textures"].schedule.cron == "0 1 * * *"
    assert lines["line-textures"].parameters == {"product_line": "textures",
                                                 "categories": ["carpet", "grid", "leather", "tile", "wood"]}
