"""Stage 1, fetch: mirror one category of an MVTec-layout dataset URL into the local cache, with a manifest."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext

from patchcore_core import fetch as fetch_lib
from tasks.common import STAGE_TASK, log, to_uri
from tasks.contracts import FetchedCategory
from tasks.settings import get_settings


def cache_root(work_dir: str, data_url: str) -> Path:
    return Path(work_dir) / "data" / fetch_lib.source_slug(data_url)


@dataclass
class SourceListing(CachePolicy):
    """Cache key component: the source listing of the category (relative paths, sizes, ETags or mtimes).

    A rerun skips the copy while the source is unchanged and copies again when any file changed or appeared,
    which is what a nightly retrain needs. A source it cannot list gives a fresh key, so the task runs and
    reports the real error. (The cache records live in the work dir beside the cached files: delete both
    together, or set PREFECT_TASKS_REFRESH_CACHE=true.)
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        data_url, category = inputs["data_url"], inputs["category"]
        try:
            files = fetch_lib.list_source_files(data_url, category, get_settings().storage_options(data_url))
        except Exception:  # noqa: BLE001 - the task itself will raise the real error
            return uuid.uuid4().hex
        digest = hashlib.sha256()
        for rel in sorted(files):
            digest.update(f"{rel}\0{files[rel]['size']}\0{files[rel]['version']}\n".encode())
        return digest.hexdigest()


@task(name="fetch", task_run_name="fetch-{category}", **{**STAGE_TASK,
      "cache_policy": STAGE_TASK["cache_policy"] + SourceListing()})
def fetch_category(data_url: str, category: str, work_dir: str) -> FetchedCategory:
    """Copy `<data_url>/<category>` (s3://, file:// or a path) into `<work_dir>/data/`, validate, checksum."""
    settings = get_settings()
    result = fetch_lib.fetch_category(
        data_url, category, cache_root(work_dir, data_url), settings.storage_options(data_url), log=log
    )
    return FetchedCategory(
        source_url=data_url,
        category=category,
        root_uri=to_uri(result.root),
        manifest_uri=to_uri(result.manifest),
        digest=result.digest,
        n_files=result.n_files,
        n_train=result.n_train,
        n_test=result.n_test,
        n_anomalous=result.n_anomalous,
    )
