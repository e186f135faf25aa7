"""Stage 3, coreset: greedy coreset selection over the train shards."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from patchcore_core.stages import select_coreset as select_lib
from tasks.common import STAGE_TASK, log, to_uri
from tasks.contracts import CoresetSelection, ExtractedFeatures, ModelConfig
from tasks.extract import split_features
from tasks.settings import get_settings


@task(name="coreset", task_run_name="coreset-{features.category}", **STAGE_TASK)
def select_coreset(features: ExtractedFeatures, config: ModelConfig, work_dir: str) -> CoresetSelection:
    """Select the memory bank from the train shards and write it as coreset.parquet."""
    settings = get_settings()
    result = select_lib(
        split_features(features, "train"), config.patchcore_params(), Path(work_dir) / "stages",
        device=settings.device, num_threads=settings.threads, log=log,
    )
    return CoresetSelection(
        category=features.category, coreset_uri=to_uri(result.path), n_train_patches=result.n_train_patches,
        n_selected=result.n_selected, dim=result.dim, grid=result.grid, fingerprint=result.fingerprint,
        seconds=result.seconds,
    )
