"""What every pipeline task shares: the cache policy, the I/O retry rule, URI helpers and the run logger."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from prefect import get_run_logger
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

import patchcore_core
from patchcore_core.stages import STAGE_FORMAT_VERSION


@dataclass
class LibraryVersion(CachePolicy):
    """Cache key component: the `patchcore_core` version and stage format, so an upgrade recomputes stages."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        return hash_objects("patchcore_core", patchcore_core.__version__, STAGE_FORMAT_VERSION)


# A stage reruns when its inputs, its task code, or the library version change; otherwise the finished
# result (a small JSON record of URIs, stored under the work dir) is reused.
STAGE_CACHE = INPUTS + TASK_SOURCE + LibraryVersion()

_PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_TRANSIENT_NAMES = {
    "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
    "ServerDisconnectedError", "ClientConnectorError", "ClientOSError", "ResponseStreamingError",
}


def is_transient_io_error(exc: BaseException | None) -> bool:
    """True when `exc` or anything in its cause chain is a retryable I/O failure (network, timeout, disk)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _TRANSIENT_NAMES:
            return True
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and not isinstance(exc, _PERMANENT_OS_ERRORS):
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
STAGE_TASK: dict[str, Any] = {"cache_policy": STAGE_CACHE, "result_serializer": "json", **IO_RETRIES}


def to_uri(path: str | os.PathLike) -> str:
    """An absolute `file://` URI for a local path (URIs pass through)."""
    text = str(path)
    return text if "://" in text else Path(text).resolve().as_uri()


def to_path(uri: str) -> Path:
    """The local path of a `file://` URI or a plain path; other schemes are not local."""
    if "://" not in uri:
        return Path(uri)
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"{uri} is not a local file URI")
    return Path(unquote(parsed.path))


def log(message: str) -> None:
    """Log through the Prefect run logger when inside a run, else print."""
    try:
        get_run_logger().info(message)
    except Exception:  # noqa: BLE001 - outside a run context
        print(message)
