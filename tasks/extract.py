"""Stage 2, extract: backbone patch features of the train/test images, as Parquet shards."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect import task

from patchcore_core.stages import SplitFeatures
from patchcore_core.stages import extract_features as extract_lib
from tasks.common import STAGE_TASK, log, to_path, to_uri
from tasks.contracts import ExtractedFeatures, FetchedCategory, ModelConfig, SplitShards
from tasks.settings import get_settings


def split_features(features: ExtractedFeatures, split: str) -> SplitFeatures:
    """The library view of one split of a stage output (local paths)."""
    s = features.splits[split]
    return SplitFeatures(
        root=str(to_path(features.features_root_uri)), category=features.category, split=split,
        shards=[str(to_path(u)) for u in s.shard_uris], n_images=s.n_images,
        patches_per_image=s.patches_per_image, dim=s.dim, grid=list(s.grid), fingerprint=s.fingerprint,
    )


@task(name="extract", task_run_name="extract-{fetched.category}-{split}", **STAGE_TASK)
def extract_features(
    fetched: FetchedCategory, config: ModelConfig, work_dir: str, split: Literal["train", "test"] = "train"
) -> ExtractedFeatures:
    """Run the backbone over one split (batched, on the GPU when present) into hive-partitioned shards."""
    settings = get_settings()
    results = extract_lib(
        str(to_path(fetched.root_uri)), fetched.category, str(to_path(fetched.manifest_uri)),
        config.patchcore_params(), Path(work_dir) / "features", splits=[split],
        device=settings.device, num_threads=settings.threads, log=log,
    )
    root = next(iter(results.values())).root
    for split, r in results.items():
        log(f"{fetched.category}/{split}: {len(r.shards)} shards ({r.n_reused} reused, {r.n_written} written)")
    return ExtractedFeatures(
        category=fetched.category,
        features_root_uri=to_uri(root),
        splits={
            split: SplitShards(
                shard_uris=[to_uri(p) for p in r.shards], n_images=r.n_images,
                patches_per_image=r.patches_per_image, dim=r.dim, grid=r.grid, fingerprint=r.fingerprint,
                n_reused=r.n_reused, n_written=r.n_written,
            )
            for split, r in results.items()
        },
    )
