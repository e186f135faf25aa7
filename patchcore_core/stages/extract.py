"""Stage 2, extract: backbone patch features of one split, as Parquet shards (see `patchcore_core.shards`).

The shards go under `<work_dir>/features/<feature fingerprint>/dataset=<d>/category=<c>/split=<s>/`. A shard
whose fingerprint (the `features` settings + the sha256 of each of its images, from the fetch manifest) matches
is reused, so a run killed halfway resumes at the first missing shard; the partition's marker is written last.
"""

from __future__ import annotations

import functools
import json
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
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime, configure_threads
from patchcore_core.stages.fetch import FetchResult, read_manifest

__all__ = ["SplitFeatures", "SplitPlan", "ShardPlan", "run", "plan", "write_part", "finish", "n_shards", "relpath"]

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


IMAGES_PER_SHARD = 32  # one shard, one extraction task: the unit a cluster spreads over its workers
IMAGES_PER_ROW_GROUP = 8  # one row group, one scoring batch


class ShardPlan(BaseModel):
    """One shard to write: the images `first`.. of a split, where it goes, and the fingerprint it must carry."""

    index: int
    first: int
    path: str
    fingerprint: str
    image_paths: list[str]
    relpaths: list[str]


class SplitPlan(BaseModel):
    """Every shard of one split and the partition's marker fingerprint: all that shard tasks need to agree on."""

    root: str
    category: str
    split: str
    partition: str
    fingerprint: str
    n_images: int
    shards: list[ShardPlan]


def n_shards(fetched: FetchResult, split: str, images_per_shard: int = IMAGES_PER_SHARD) -> int:
    """How many shards (extraction tasks) a split of the fetched category makes."""
    n = fetched.n_train if split == "train" else fetched.n_test
    return -(-n // images_per_shard)


def plan(fetched: FetchResult, params: DetectorParams, split: str, work_dir: str | os.PathLike,
         images_per_shard: int = IMAGES_PER_SHARD) -> SplitPlan:
    """The split's shards: paths and fingerprints from the `features` settings and each image's sha256."""
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
    shards = []
    for index, first in enumerate(range(0, len(samples), images_per_shard)):
        chunk = slice(first, first + images_per_shard)
        shards.append(ShardPlan(
            index=index, first=first, path=str(shard_io.shard_path(root, category, split, index, dataset)),
            fingerprint=fingerprint("shard", feature_params, first, [checksums[r] for r in rels[chunk]]),
            image_paths=[s.path for s in samples[chunk]], relpaths=rels[chunk]))
    return SplitPlan(root=str(root), category=category, split=split,
                     partition=str(shard_io.partition_dir(root, category, split, dataset)),
                     fingerprint=fingerprint("split", feature_params, [checksums[r] for r in rels], images_per_shard),
                     n_images=len(samples), shards=shards)


@functools.lru_cache(maxsize=1)
def _feature_model(estimator_params: str, device: str, num_threads: int | None):
    """The backbone of one settings, built once per process: every shard task of a worker, every split and every
    category with these settings reuse it (its weights are small next to a coreset's working set)."""
    from patchcore_core.baselines import make_detector

    return make_detector("patchcore", strict=False, **json.loads(estimator_params), device=device,
                         num_threads=num_threads, progress=False)


def write_part(shard: ShardPlan, params: DetectorParams, runtime: Runtime = DEFAULT_RUNTIME,
               images_per_row_group: int = IMAGES_PER_ROW_GROUP) -> bool:
    """Write one shard unless a complete one with its fingerprint is there; True when it was written."""
    if shard_io.shard_is_complete(shard.path, shard.fingerprint):
        return False
    model = _feature_model(json.dumps(params.estimator_params(), sort_keys=True), runtime.device,
                           runtime.num_threads)
    if runtime.num_threads is not None:  # in this thread, now: the cached model set them once, maybe elsewhere
        configure_threads(runtime.num_threads)
    batches = list(model.iter_features(shard.image_paths))
    meta = {"fingerprint": shard.fingerprint, "grid": list(batches[-1][1]), "relpaths": shard.relpaths}
    shard_io.write_shard(Path(shard.path), np.concatenate([b[0] for b in batches]), shard.first, meta,
                         images_per_row_group)
    runtime.say(f"wrote {'/'.join(Path(shard.path).parts[-3:])} ({len(shard.relpaths)} images)")
    return True


def finished(split: SplitPlan) -> SplitFeatures | None:
    """The split's features when its partition marker matches (every shard complete), else None."""
    done = StageDir(split.partition, split.fingerprint).finished()
    return None if done is None else SplitFeatures(**{**done, "n_reused": len(done["shards"]), "n_written": 0})


def finish(split: SplitPlan, n_written: int = 0) -> SplitFeatures:
    """Check every shard is complete, drop stale ones, and write the partition marker (last, once)."""
    if (done := finished(split)) is not None:
        return done
    incomplete = [s.path for s in split.shards if not shard_io.shard_is_complete(s.path, s.fingerprint)]
    if incomplete:
        raise DataError(f"{split.category}/{split.split}: shard {incomplete[0]} is missing or incomplete")
    paths = [s.path for s in split.shards]
    # Shards past the end belong to an older, longer listing: drop them so the partition is exact.
    for stale in Path(split.partition).glob("part-*.parquet"):
        if str(stale) not in paths:
            stale.unlink()
    meta = shard_io.read_shard_metadata(paths[-1])
    result = SplitFeatures(
        root=split.root, category=split.category, split=split.split, shards=paths, n_images=split.n_images,
        patches_per_image=int(meta["patches_per_image"]),
        dim=int(pq.read_schema(paths[-1]).field("embedding").type.list_size),
        grid=[int(g) for g in meta["grid"]], fingerprint=split.fingerprint,
        n_reused=len(paths) - n_written, n_written=n_written,
    )
    StageDir(split.partition, split.fingerprint).finish(result.model_dump(exclude={"n_reused", "n_written"}),
                                                        outputs=paths)
    return result


def run(
    fetched: FetchResult,
    params: DetectorParams,
    split: str,
    work_dir: str | os.PathLike,
    runtime: Runtime = DEFAULT_RUNTIME,
    images_per_shard: int = IMAGES_PER_SHARD,
    images_per_row_group: int = IMAGES_PER_ROW_GROUP,
) -> SplitFeatures:
    """Run the backbone over `split` of the fetched category and write (or reuse) its shards, one after another.

    The same `plan` / `write_part` / `finish` a cluster runs as one task per shard (flows/patchcore.py).
    """
    split_plan = plan(fetched, params, split, work_dir, images_per_shard)
    if (done := finished(split_plan)) is not None:
        return done
    written = sum(write_part(shard, params, runtime, images_per_row_group) for shard in split_plan.shards)
    return finish(split_plan, written)
