"""What every pipeline task shares: the one retry rule (transient I/O only), the runtime from the settings, and
the run logger. Tasks keep no cache of their own: a stage's folder and marker (patchcore_core.artifacts) are the
one cache, so deleting an output makes the next run recompute it."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.cache_policies import NO_CACHE

from patchcore_core.errors import PatchCoreError
from patchcore_core.runtime import Runtime, configure_threads
from tasks.settings import get_settings

_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_PERMANENT_NAMES = {"UnidentifiedImageError", "DecompressionBombError"}  # Pillow: bad bytes, not a bad network
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ResponseStreamingError",
}


def is_transient_io_error(exc: BaseException | None) -> bool:
    """True when `exc` or anything in its cause chain is a retryable I/O failure (network, timeout, disk).

    Errors this library raises on purpose (bad data, bad settings, missing weights) are permanent and fail at
    once with their message, unless a network error caused them ("cannot list s3://..." while the endpoint is
    down). Under such an error a plain OSError is an image decode error (Pillow raises those), not I/O.
    """
    seen, library_error = set(), False
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _PERMANENT_NAMES:
            return False
        if type(exc).__name__ in _TRANSIENT_NAMES or isinstance(exc, ConnectionError | TimeoutError):
            return True
        library_error = library_error or isinstance(exc, PatchCoreError)
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS) and not library_error:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def retry_on_io(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry I/O failures only; bad data or settings fail at once."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify every failure
        return is_transient_io_error(exc)
    return False


IO_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": [2, 5, 15], "retry_condition_fn": retry_on_io}
STAGE_TASK: dict[str, Any] = {"cache_policy": NO_CACHE, **IO_RETRIES}


def log(message: str) -> None:
    """Log through the Prefect run logger when inside a run, else print."""
    try:
        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - outside a run context
        print(message)


def dask_task_threads(budget: int | None) -> int | None:
    """Compute threads for a task on a Dask worker: the worker's budget (`budget`, i.e. its PATCHCORE_THREADS, else
    its thread count) shared among the tasks it runs at once (its thread count); None outside a Dask worker."""
    try:
        from distributed import get_worker

        slots = int(get_worker().state.nthreads)
    except (ImportError, ValueError):
        return None
    return max(1, (budget or slots) // slots)


def runtime() -> Runtime:
    """Device and threads from the pipeline settings (environment), progress to the run log.

    On a Dask worker the tasks running at once share its compute threads (`dask_task_threads`): a worker started
    with `--nthreads 1` and PATCHCORE_THREADS=8 runs one task on 8 torch / faiss threads, one with
    `--nthreads 4` and no PATCHCORE_THREADS runs 4 tasks on 1 thread each; a worker never runs more.
    Thread counts are set here, in the thread that runs the task: OpenMP keeps them per thread, and a task runner's
    thread would otherwise use every core (and other bits than a run with the configured count).
    """
    settings = get_settings()
    threads = configure_threads(dask_task_threads(settings.threads) or settings.threads)
    return Runtime(device=settings.device, num_threads=threads, log=log)
