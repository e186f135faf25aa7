"""Stage 2, extract: backbone patch features of one split, as Parquet shards (see `patchcore_core.shards`).

The shards go under `<work_dir>/features/<feature fingerprint>/dataset=<d>/category=<c>/split=<s>/`. A shard
whose fingerprint (the `features` settings + the sha256 of each of its images, from the fetch manifest) matches
is reused, so a run killed halfway resumes at the first missing shard; the partition's marker is written last.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from pydantic import BaseModel

from patchcore_core import shards as shard_io
from patchcore_core.artifacts import StageDir, fingerprint
from patchcore_core.config import DetectorParams
from patchcore_core.data import CategoryListing, list_category
from patchcore_core.errors import DataError
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime
from patchcore_core.stages.fetch import FetchResult, read_manifest

__all__ = ["SplitFeatures", "run", "relpath"]

SPLITS = ("train", "test")


class SplitFeatures(BaseModel):
    """The shards of one split, in image order; `n_reused` of them came from an earlier run."""

    root: str
    category: str
    split: str
    shards: list[str]
    n_images: int
    patches_per_image: int
    dim: int
    grid: list[int]
    fingerprint: str
    n_reused: int = 0
    n_written: int = 0


def relpath(listing: CategoryListing, path: str) -> str:
    """A sample's path relative to its category folder, with forward slashes (as in the fetch manifest)."""
    base = str(Path(listing.root) / listing.category) + os.sep
    return path[len(base) :].replace(os.sep, "/") if path.startswith(base) else path


def run(
    fetched: FetchResult,
    params: DetectorParams,
    split: str,
    work_dir: str | os.PathLike,
    runtime: Runtime = DEFAULT_RUNTIME,
    images_per_shard: int = 32,
    images_per_row_group: int = 8,
) -> SplitFeatures:
    """Run the backbone over `split` of the fetched category and write (or reuse) its shards."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    category = fetched.category
    listing = list_category(fetched.root, category)
    samples = listing.train if split == "train" else listing.test
    if not samples:
        raise DataError(f"{fetched.root}/{category} has no {split} images")
    checksums = {rel: row["sha256"] for rel, row in read_manifest(fetched.manifest).items()}
    rels = [relpath(listing, s.path) for s in samples]
    missing = [r for r in rels if r not in checksums]
    if missing:
        raise DataError(f"{fetched.manifest} lists no checksum for {missing[:3]} (cache and manifest disagree)")
    feature_params = params.stage_params("features")
    root = Path(work_dir) / "features" / fingerprint("features", feature_params)
    dataset = Path(fetched.root).name
    part = StageDir(shard_io.partition_dir(root, category, split, dataset),
                    fingerprint("split", feature_params, [checksums[r] for r in rels]))
    if (done := part.finished()) is not None:
        return SplitFeatures(**{**done, "n_reused": len(done["shards"]), "n_written": 0})

    model, paths, reused, written, meta = None, [], 0, 0, {}
    for first in range(0, len(samples), images_per_shard):
        chunk = slice(first, first + images_per_shard)
        shard_fp = fingerprint("shard", feature_params, first, [checksums[r] for r in rels[chunk]])
        path = shard_io.shard_path(root, category, split, first // images_per_shard, dataset)
        if shard_io.shard_is_complete(path, shard_fp):
            reused += 1
        else:
            if model is None:
                from patchcore_core.baselines import make_detector

                model = make_detector("patchcore", strict=False, **params.estimator_params(),
                                      **runtime.estimator_kwargs())
            batches = list(model.iter_features([s.path for s in samples[chunk]]))
            meta = {"fingerprint": shard_fp, "grid": list(batches[-1][1]), "relpaths": rels[chunk]}
            shard_io.write_shard(path, np.concatenate([b[0] for b in batches]), first, meta, images_per_row_group)
            written += 1
            runtime.say(f"{category}/{split}: wrote {path.name} ({len(rels[chunk])} images)")
        meta = shard_io.read_shard_metadata(path)
        paths.append(str(path))
    # Shards past the end belong to an older, longer listing: drop them so the partition is exact.
    for stale in part.path.glob("part-*.parquet"):
        if str(stale) not in paths:
            stale.unlink()
    result = SplitFeatures(
        root=str(root), category=category, split=split, shards=paths, n_images=len(samples),
        patches_per_image=int(meta["patches_per_image"]), dim=int(pq.read_schema(paths[-1]).field("embedding")
                                                                    .type.list_size),
        grid=[int(g) for g in meta["grid"]], fingerprint=part.fingerprint, n_reused=reused, n_written=written,
    )
    part.finish(result.model_dump(exclude={"n_reused", "n_written"}), outputs=paths)
    return result
