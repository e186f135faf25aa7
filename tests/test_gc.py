"""Crash hygiene with real killed processes: the next run marks what a SIGKILLed run left RUNNING as FAILED
(MLflow) and Crashed (Prefect); `python -m tasks.gc` removes its stray temporary files and old stage folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from patchcore_core.config import DetectorParams

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = Path(__file__).resolve().parents[1]
CONFIG = DetectorParams(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4)

KILLED_DURING_A_WRITE = """
import os, signal, sys
from pathlib import Path
from prefect import task
import flows.patchcore as pipeline
from patchcore_core.artifacts import atomic_write
from patchcore_core.config import DetectorParams

@task(name="coreset")
def killed_while_writing(features, params, work_dir):
    with atomic_write(Path(work_dir) / "stages" / "brick" / "coreset-killed" / "coreset.parquet") as tmp:
        tmp.write_bytes(b"half a file")
        os.kill(os.getpid(), signal.SIGKILL)  # as an OOM killer or a lost node would, mid-write

pipeline.select_coreset = killed_while_writing
pipeline.patchcore(mode="full-benchmark", data_url=sys.argv[1], categories=["brick"],
                   config=DetectorParams.model_validate_json(sys.argv[2]), work_dir=sys.argv[3])
"""


def _flow_run_states(ids: list[str]) -> dict[str, str]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return {i: client.read_flow_run(i).state.type.value for i in ids}


def test_killed_run_is_swept_by_the_next_run_and_gc(pipeline_env, pipeline_dataset):
    from mlflow import MlflowClient
    from prefect.settings import PREFECT_API_URL

    from flows.patchcore import patchcore

    work = pipeline_env["work_dir"]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(REPO))
    killed = subprocess.run([sys.executable, "-c", KILLED_DURING_A_WRITE, str(pipeline_dataset),
                             CONFIG.model_dump_json(), str(work)], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]

    client = MlflowClient(pipeline_env["tracking_uri"], pipeline_env["tracking_uri"])
    exp = client.get_experiment_by_name("patchcore-benchmark")
    left = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert {r.data.tags["mlflow.runName"] for r in left} == {"full-benchmark", "brick"}
    _pid_of(left)  # one process, and it is gone
    flow_runs = sorted({r.data.tags["prefect.flow_run_id"] for r in left})
    assert set(_flow_run_states(flow_runs).values()) == {"RUNNING"}
    stray = [p for p in (work / "stages" / "brick").rglob(".*.tmp")]
    assert len(stray) == 1, stray

    # The next run sweeps them first: the dead process's runs are FAILED / Crashed, its own run finishes.
    state = patchcore(mode="full-benchmark", data_url=str(pipeline_dataset), categories=["brick"], config=CONFIG,
                      work_dir=str(work), return_state=True)
    assert state.is_completed(), state.message
    for run in left:
        after = client.get_run(run.info.run_id)
        assert after.info.status == "FAILED" and "is gone" in after.data.tags["patchcore.gc"]
    states = _flow_run_states(flow_runs)
    assert set(states.values()) == {"CRASHED"}, states
    parent = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    assert {r.data.tags["mlflow.runName"] for r in parent} == {"full-benchmark", "brick"}

    # gc: the stray temporary file, and stage folders unused for longer than the retention.
    old = time.time() - 10 * 86400
    finished = sorted(p for p in (work / "stages" / "brick").iterdir() if p.name.startswith("metrics-"))
    kept = sorted(p for p in (work / "stages" / "brick").iterdir() if p.name.startswith("score-"))
    for folder in finished:
        for p in [*folder.rglob("*"), folder]:
            os.utime(p, (old, old))
    gc_env = {**env, "PATCHCORE_WORK_DIR": str(work)}
    swept = subprocess.run([sys.executable, "-m", "tasks.gc", "--older-than-days", "5", "--tmp-older-than-hours",
                            "0"], env=gc_env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert not any(p.exists() for p in stray), swept.stdout
    assert finished and not any(p.exists() for p in finished), swept.stdout
    assert kept and all(p.is_dir() for p in kept)
    assert "1 temporary file(s)" in swept.stdout and f"{len(finished)} stage folder(s) removed" in swept.stdout

    # A removed stage is recomputed by the next run, with the same metrics.
    again = patchcore(mode="full-benchmark", data_url=str(pipeline_dataset), categories=["brick"], config=CONFIG,
                      work_dir=str(work), return_state=True)
    assert again.is_completed(), again.message
    [run] = again.result()
    assert Path(run.evaluation.metrics_path).is_file()


def _pid_of(runs) -> str:
    [pid] = {r.data.tags["patchcore.pid"] for r in runs}
    assert not Path(f"/proc/{pid}").exists()
    return pid


def test_dead_process_detection():
    from tasks.gc import is_dead, owner_tags

    mine = owner_tags()
    assert not is_dead(mine)
    assert is_dead({**mine, "patchcore.pid_start": "1"})  # its pid now belongs to another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert is_dead({**mine, "patchcore.pid": str(child.pid), "patchcore.pid_start": ""})
    assert not is_dead({**mine, "patchcore.host": "another-host", "patchcore.pid": str(child.pid)})


def test_zombie_automation_is_created_once():
    from prefect.automations import Automation

    from tasks.gc import ensure_zombie_automation

    first = ensure_zombie_automation(after_seconds=600)
    assert ensure_zombie_automation() == first  # idempotent
    automation = Automation.read(id=first)
    assert automation.enabled and automation.trigger.posture.value == "Proactive"
    assert automation.trigger.within.total_seconds() == 600
    assert automation.actions[0].type == "change-flow-run-state" and automation.actions[0].state.value == "CRASHED"


def test_runs_of_another_host_are_swept_once_prefect_has_crashed_their_flow_run(tmp_path):
    """A Kubernetes pod's runs: their pid cannot be checked from here, so Prefect's state decides. The flow run
    Prefect marked Crashed (as its heartbeat automation does when a pod dies) has its MLflow run FAILED; the
    one still running elsewhere is left alone."""
    from mlflow import MlflowClient
    from prefect import flow, get_client
    from prefect.states import Crashed, Running

    from tasks.gc import HOST_TAG, PID_TAG, START_TAG, sweep_dead_runs

    @flow(name="pod-flow")
    def pod_flow() -> None:
        """Never run: only its flow runs are created, as a worker on another machine would have."""

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(uri, uri)
    experiment = mlflow.create_experiment("pods")
    runs = {}
    with get_client(sync_client=True) as prefect:
        for pod in ("died", "alive"):
            flow_run = prefect.create_flow_run(pod_flow, state=Running())
            tags = {HOST_TAG: f"patchcore-worker-{pod}", PID_TAG: "1", START_TAG: "42",
                    "prefect.flow_run_id": str(flow_run.id)}
            runs[pod] = mlflow.create_run(experiment, tags=tags).info.run_id
            if pod == "died":
                prefect.set_flow_run_state(flow_run.id, Crashed(message="no heartbeat for 540s"), force=True)

    report = sweep_dead_runs(uri)
    assert report.failed_mlflow_runs == [runs["died"]]
    died, alive = mlflow.get_run(runs["died"]), mlflow.get_run(runs["alive"])
    assert died.info.status == "FAILED" and "is Crashed" in died.data.tags["patchcore.gc"]
    assert "patchcore-worker-died" in died.data.tags["patchcore.gc"]
    assert alive.info.status == "RUNNING" and "patchcore.gc" not in alive.data.tags
