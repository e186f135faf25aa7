"""Stage 4, index: faiss Flat and/or IVFPQ indices over the coreset, saved as PatchCore model folders."""

from __future__ import annotations

from pathlib import Path

from prefect import task

from patchcore_core.stages import CoresetResult, build_indices
from tasks.common import STAGE_TASK, to_path, to_uri
from tasks.contracts import CoresetSelection, ModelConfig, TrainedModel
from tasks.settings import get_settings


@task(name="index", task_run_name="index-{coreset.category}", **STAGE_TASK)
def build_index(coreset: CoresetSelection, config: ModelConfig, work_dir: str) -> TrainedModel:
    """Index the coreset with each kind in `config.indices`; the first is the primary (scored) model."""
    settings = get_settings()
    path = to_path(coreset.coreset_uri)
    result = build_indices(
        CoresetResult(str(path.parent), str(path), coreset.n_train_patches, coreset.n_selected, coreset.dim,
                      coreset.grid, coreset.fingerprint),
        config.patchcore_params(), config.indices, Path(work_dir) / "stages", coreset.category,
        device=settings.device, num_threads=settings.threads,
    )
    return TrainedModel(
        category=coreset.category, model_uri=to_uri(result.model_dir),
        model_uris={kind: to_uri(p) for kind, p in result.models.items()}, primary_index=result.primary,
        fingerprint=result.fingerprint, params=result.params,
    )
