"""Which task runner the flows submit their stage tasks to: one thread (the default), or a Dask cluster.

    default                         ThreadPoolTaskRunner(max_workers=1): the stages run one after another in
                                    the flow's process, exactly as a plain function call would
    PATCHCORE_DASK_ADDRESS=tcp://…  prefect-dask's DaskTaskRunner on that existing scheduler
    PATCHCORE_DASK_WORKERS=N        a local Dask cluster of N worker processes on 127.0.0.1
                                    (PATCHCORE_DASK_THREADS_PER_WORKER threads each, PATCHCORE_DASK_MEMORY_LIMIT)

Every submitted task carries its inputs (typed stage results, no arrays) and writes its outputs to the shared
work dir, so the results are the same bits on any runner with the same threads per task. On a Dask worker the
tasks running at once share the worker's compute threads (tasks.common.runtime).
"""

from __future__ import annotations

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from tasks.settings import get_settings


def task_runner(dask_address: str | None = None, dask_workers: int | None = None) -> TaskRunner:
    """The runner the arguments ask for, else the one the environment (PATCHCORE_DASK_*) asks for."""
    settings = get_settings()
    if dask_address is None and dask_workers is None:
        dask_address, dask_workers = settings.dask_address, settings.dask_workers
    if dask_address:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=dask_address)
    if dask_workers:
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=local_cluster_kwargs(
            dask_workers, settings.dask_threads_per_worker, settings.dask_memory_limit))
    return ThreadPoolTaskRunner(max_workers=1)


class WorkerLostError(RuntimeError):
    """Dask gave up on a task because every worker that ran it died (memory limit, OOM killer, a crash)."""


def explain_lost_worker(exc: BaseException) -> BaseException:
    """Dask's KilledWorker reworded to name the stage, the likely cause and the setting; other errors unchanged."""
    try:
        from distributed import KilledWorker
    except ImportError:  # no Dask installed: nothing to explain
        return exc
    if not isinstance(exc, KilledWorker):
        return exc
    stage = str(exc.task).rsplit("-", 1)[0]  # Prefect's Dask keys are "<task name>-<uuid hex>"
    settings = get_settings()
    limit = ("the scheduler's workers' --memory-limit" if settings.dask_address
             else f"PATCHCORE_DASK_MEMORY_LIMIT={settings.dask_memory_limit}")
    error = WorkerLostError(
        f"stage {stage}: the Dask worker running it died {exc.allowed_failures + 1} time(s) "
        f"(last {getattr(exc.last_worker, 'address', exc.last_worker)}), most often from its memory limit "
        f"({limit}; docs/scale.md gives each stage's peak) or the OOM killer: the worker's log says which")
    error.__cause__ = exc
    return error


def local_cluster_kwargs(workers: int, threads_per_worker: int = 1, memory_limit: str = "auto") -> dict:
    """A loopback-only LocalCluster of worker processes; its dashboard on a free loopback port (the link is in the
    flow run's log), so that concurrent runs never collide on 8787."""
    if workers < 1 or threads_per_worker < 1:
        from patchcore_core.errors import ConfigError

        raise ConfigError(f"setting dask workers/threads: must be >= 1 (got {workers} x {threads_per_worker})")
    # The workers' compute budget is their own thread count, whatever PATCHCORE_THREADS the flow process has.
    return {"n_workers": workers, "threads_per_worker": threads_per_worker, "processes": True,
            "host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "memory_limit": memory_limit,
            "env": {"PATCHCORE_THREADS": str(threads_per_worker), "NUMBA_NUM_THREADS": str(threads_per_worker)},
            "config": WORKER_MEMORY_CONFIG}


# The stages keep no data in Dask's memory (each writes its output to the work dir and returns paths), so Dask's
# spilling has nothing to spill, and its pause at 80 % of the limit would wait forever for memory that only the
# process holds (the freed heap that tune_allocator keeps, torch's caches): a worker paused between two stages
# never takes the next one. The limit stays a hard bound: the nanny restarts a worker at 95 % of it.
WORKER_MEMORY_CONFIG = {"distributed.worker.memory.target": False, "distributed.worker.memory.spill": False,
                        "distributed.worker.memory.pause": False}
