"""Crash hygiene: what a killed run leaves behind, swept by the next run or by hand.

    python -m tasks.gc --work-dir runs/pipeline [--older-than-days 30] [--tmp-older-than-hours 6] [--dry-run]

* MLflow runs left RUNNING by a dead process are marked FAILED. Every run the pipeline starts is tagged with
  the host, pid and the process's start time (`patchcore.host`, `patchcore.pid`, `patchcore.pid_start`); a
  run is dead when that process no longer exists on this host (a reused pid has another start time). A run
  of another host (a Kubernetes pod, another worker machine) is dead when Prefect has marked its flow run
  Crashed or Cancelled: the heartbeat automation below does that when a pod dies. Every flow run of the
  full-benchmark and nightly-retrain modes does this sweep first (`sweep_dead_runs`).
* The Prefect flow run behind such an MLflow run (`prefect.flow_run_id` tag), and its parent flow runs, are
  set to Crashed when they are still RUNNING. Runs started by a worker are also covered by Prefect's own
  mechanism: flow runs emit heartbeats (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default) and the automation
  `ensure_zombie_automation()` creates (`--prefect-automation`) marks a run Crashed when they stop.
* Stray temporary files of atomic writes (`.NAME.XXXX.tmp`, e.g. `.part-00000.parquet.XXXX.tmp`, temporary
  folders of atomic_dir and `.NAME.old`) older than `--tmp-older-than-hours` are removed (a live writer's
  files are younger than that).
* Stage folders (`stages/<category>/<stage>-<fp>/`, `features/<fp>/.../split=<split>/`) not used for
  `--older-than-days` days (PATCHCORE_RETENTION_DAYS) are removed: each task touches its stage folder when it
  returns it, so a folder still reused every night is kept. A removed folder is simply recomputed if needed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

HOST_TAG, PID_TAG, START_TAG = "patchcore.host", "patchcore.pid", "patchcore.pid_start"
_TMP_SUFFIXES = (".tmp", ".old")


class SweepReport(BaseModel):
    failed_mlflow_runs: list[str] = []
    crashed_flow_runs: list[str] = []
    removed_tmp: list[str] = []
    removed_stage_dirs: list[str] = []

    def summary(self) -> str:
        return (f"{len(self.failed_mlflow_runs)} dead MLflow run(s) marked FAILED, {len(self.crashed_flow_runs)} "
                f"Prefect flow run(s) marked Crashed, {len(self.removed_tmp)} temporary file(s) and "
                f"{len(self.removed_stage_dirs)} stage folder(s) removed")


# ---------------------------------------------------------------------------------------------- processes


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, from /proc), or None when it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "; the comm may hold spaces
    if fields[0] == "Z":  # a zombie has exited: only its parent has not reaped it yet
        return None
    return fields[19]  # field 22 of proc(5)


def owner_tags() -> dict[str, str]:
    """The tags that let a later sweep tell whether the process that started a run is still alive."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), START_TAG: process_start(pid) or ""}


def is_dead(tags: dict[str, str]) -> bool:
    """True when the run's process is known to be gone: same host, and no process with that pid and start."""
    if tags.get(HOST_TAG) != socket.gethostname() or not tags.get(PID_TAG, "").isdigit():
        return False
    started = process_start(int(tags[PID_TAG]))
    return started is None or (bool(tags.get(START_TAG)) and started != tags[START_TAG])


# ---------------------------------------------------------------------------------------------- MLflow + Prefect


def sweep_dead_runs(tracking_uri: str, crash_flow_runs: bool = True, dry_run: bool = False) -> SweepReport:
    """Mark MLflow runs whose process died as FAILED, and their Prefect flow runs (and parents) as Crashed."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri, tracking_uri)
    report = SweepReport()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    if not experiments:
        return report
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'", max_results=5000)
    dead = {r.info.run_id: f"process {r.data.tags[PID_TAG]} on {r.data.tags[HOST_TAG]} is gone"
            for r in running if is_dead(r.data.tags)}
    elsewhere = {r.data.tags["prefect.flow_run_id"]: r for r in running
                 if r.data.tags.get(HOST_TAG) not in (None, socket.gethostname()) and r.data.tags.get(
                     "prefect.flow_run_id")}
    if crash_flow_runs and elsewhere:  # the pid cannot be checked from here: Prefect's state says
        for flow_run_id, state in ended_flow_runs(list(elsewhere)).items():
            tags = elsewhere[flow_run_id].data.tags
            dead[elsewhere[flow_run_id].info.run_id] = f"its flow run {flow_run_id} on {tags[HOST_TAG]} is {state}"
    flow_runs: list[str] = []
    for run in running:
        if run.info.run_id not in dead:
            continue
        report.failed_mlflow_runs.append(run.info.run_id)
        if run.data.tags.get("prefect.flow_run_id"):
            flow_runs.append(run.data.tags["prefect.flow_run_id"])
        if not dry_run:
            client.set_tag(run.info.run_id, "patchcore.gc", dead[run.info.run_id])
            client.set_terminated(run.info.run_id, "FAILED")
    if crash_flow_runs and flow_runs:
        report.crashed_flow_runs = crash_flow_run_chain(flow_runs, dry_run=dry_run)
    return report


def ended_flow_runs(flow_run_ids: list[str]) -> dict[str, str]:
    """Of these Prefect flow runs, those whose process Prefect knows is gone (Crashed: the heartbeat automation;
    Cancelled), with that state's name. Needs a reachable Prefect API."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterState
    from prefect.client.schemas.filters import FlowRunFilterStateType as StateTypes
    from prefect.client.schemas.objects import StateType

    ids = []
    for flow_run_id in flow_run_ids:
        try:
            ids.append(UUID(flow_run_id))
        except ValueError:  # a hand-edited tag: nothing to ask Prefect
            continue
    ended = FlowRunFilterState(type=StateTypes(any_=[StateType.CRASHED, StateType.CANCELLED]))
    found = {}
    with get_client(sync_client=True) as client:
        for first in range(0, len(ids), 200):  # the API's page size
            chunk = ids[first:first + 200]
            for run in client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk),
                                                                           state=ended), limit=len(chunk)):
                found[str(run.id)] = run.state.name if run.state is not None else "ended"
    return found


def crash_flow_run_chain(flow_run_ids: list[str], dry_run: bool = False) -> list[str]:
    """Set each flow run still RUNNING, and its parent flow runs still RUNNING, to Crashed (Prefect's state for
    a run whose infrastructure died). Needs a reachable Prefect API; returns the ids it changed."""
    from uuid import UUID

    from prefect import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.states import Crashed

    changed: list[str] = []
    with get_client(sync_client=True) as client:
        todo, seen = [UUID(str(i)) for i in flow_run_ids], set()
        while todo:
            run_id = todo.pop()
            if run_id in seen:
                continue
            seen.add(run_id)
            try:
                run = client.read_flow_run(run_id)
            except ObjectNotFound:
                continue
            if run.state is None or not run.state.is_running():
                continue
            if not dry_run:
                client.set_flow_run_state(run_id, Crashed(message="its process is gone (patchcore gc)"), force=True)
            changed.append(str(run_id))
            if run.parent_task_run_id:
                parent = client.read_task_run(run.parent_task_run_id)
                if parent.flow_run_id:
                    todo.append(parent.flow_run_id)
    return changed


def ensure_zombie_automation(after_seconds: int | None = None) -> str:
    """Prefect's own zombie detection: an automation that marks a flow run Crashed when its heartbeats stop for
    `after_seconds` (default: three heartbeat periods, PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s unless set; use
    the worker's value). Flow runs emit heartbeats by default. Returns the automation id."""
    from datetime import timedelta

    from prefect import get_client
    from prefect.settings import get_current_settings

    after_seconds = after_seconds or 3 * int(get_current_settings().flows.heartbeat_frequency or 180)
    from prefect.automations import Automation
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    name = "patchcore-crash-zombie-flow-runs"
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name)
    if existing:
        return str(existing[0].id)
    automation = Automation(
        name=name,
        description="Mark a flow run Crashed when its heartbeats stop (its process died).",
        trigger=EventTrigger(
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Failed",
                    "prefect.flow-run.Cancelled", "prefect.flow-run.Crashed"},
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=after_seconds),
        ),
        actions=[ChangeFlowRunState(state="CRASHED", message=f"no heartbeat for {after_seconds}s")],
    ).create()
    return str(automation.id)


# ---------------------------------------------------------------------------------------------- files


def _age_s(path: Path, now: float) -> float:
    """Seconds since `path` (a file or a folder, with everything under it) was last written or touched."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for p in path.rglob("*"):
            try:
                newest = max(newest, p.lstat().st_mtime)
            except FileNotFoundError:
                pass
    return now - newest


def _is_tmp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(_TMP_SUFFIXES)


def remove_stray_tmp(work_dir: str | os.PathLike, older_than_s: float, dry_run: bool = False) -> list[str]:
    """Temporary files and folders of atomic writes under the work dir, older than `older_than_s`."""
    now, removed = time.time(), []
    for path in sorted(Path(work_dir).rglob(".*")):
        if not _is_tmp(path) or not path.exists() or any(_is_tmp(p) for p in path.parents):
            continue
        if _age_s(path, now) < older_than_s:
            continue
        removed.append(str(path))
        if not dry_run:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
    return removed


def stage_dirs(work_dir: str | os.PathLike) -> list[Path]:
    """Every stage folder: `stages/<category>/<stage>-<fp>/` and the feature partitions `.../split=<split>/`."""
    work = Path(work_dir)
    found = [p for p in work.glob("stages/*/*") if p.is_dir() and not p.name.startswith(".")]
    found += [p for p in work.glob("features/*/**/split=*") if p.is_dir()]
    return sorted(found)


def touch_used(*paths: str | os.PathLike) -> None:
    """Record that a stage folder was (re)used now: its folder's mtime, which retention reads."""
    for path in paths:
        try:
            os.utime(path)
        except OSError:
            pass


def remove_old_stage_dirs(work_dir: str | os.PathLike, older_than_s: float, dry_run: bool = False) -> list[str]:
    """Stage folders not written nor used for `older_than_s`, then the empty folders left above them."""
    now, removed = time.time(), []
    work = Path(work_dir)
    for path in stage_dirs(work):
        if _age_s(path, now) < older_than_s:
            continue
        removed.append(str(path))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
            parent = path.parent
            while parent != work and parent.is_dir() and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    return removed


# ---------------------------------------------------------------------------------------------- entry point


def sweep(work_dir: str | os.PathLike, tracking_uri: str | None, older_than_days: float | None,
          tmp_older_than_hours: float = 6.0, dry_run: bool = False) -> SweepReport:
    """All of the above for one work dir (and its MLflow store); stage retention only when a limit is given."""
    from prefect.settings import PREFECT_API_URL

    # Prefect flow runs are crashed through the API named by PREFECT_API_URL (never a throw-away ephemeral one).
    report = (sweep_dead_runs(tracking_uri, crash_flow_runs=bool(PREFECT_API_URL.value()), dry_run=dry_run)
              if tracking_uri else SweepReport())
    report.removed_tmp = remove_stray_tmp(work_dir, tmp_older_than_hours * 3600, dry_run)
    if older_than_days is not None:
        report.removed_stage_dirs = remove_old_stage_dirs(work_dir, older_than_days * 86400, dry_run)
    return report


@task(name="sweep-dead-runs", cache_policy=NO_CACHE)
def sweep_dead_runs_task(work_dir: str) -> SweepReport:
    """The next run's sweep: MLflow runs (and their Prefect flow runs) left RUNNING by a dead process."""
    from tasks.common import log
    from tasks.tracking import tracking_uri

    report = sweep_dead_runs(tracking_uri(work_dir))
    if report.failed_mlflow_runs:
        log(f"crash hygiene: {report.summary()}: {', '.join(report.failed_mlflow_runs)}")
    return report


def main(argv: list[str] | None = None) -> int:
    from tasks.settings import get_settings
    from tasks.tracking import tracking_uri

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m tasks.gc", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=str(settings.work_dir))
    parser.add_argument("--older-than-days", type=float, default=settings.retention_days,
                        help="remove stage folders unused for this many days (default PATCHCORE_RETENTION_DAYS; "
                             "none: keep them)")
    parser.add_argument("--tmp-older-than-hours", type=float, default=6.0,
                        help="remove temporary files of atomic writes older than this (default 6)")
    parser.add_argument("--no-mlflow", action="store_true", help="leave MLflow and Prefect runs alone")
    parser.add_argument("--prefect-automation", action="store_true",
                        help="also create Prefect's heartbeat automation that crashes zombie flow runs")
    parser.add_argument("--dry-run", action="store_true", help="list what would change, change nothing")
    args = parser.parse_args(argv)
    work = settings.resolve_work_dir(args.work_dir)
    if args.prefect_automation:
        print(f"zombie flow-run automation: {ensure_zombie_automation()}")
    report = sweep(work, None if args.no_mlflow else tracking_uri(work), args.older_than_days,
                   args.tmp_older_than_hours, args.dry_run)
    for title, items in report.model_dump().items():
        for item in items:
            print(f"{title}: {item}")
    print(("would have: " if args.dry_run else "") + report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
