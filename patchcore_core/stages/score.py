"""Stage 5, score: image scores and anomaly maps of the test split, from the test shards, plus the one writer of
score artifacts (predictions.parquet, anomaly_maps.npy, gt_masks.npy) that every detector's evaluation uses."""

from __future__ import annotations

import functools
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from patchcore_core import shards as shard_io
from patchcore_core.artifacts import (
    MAPS_FILE,
    MASKS_FILE,
    MODEL_FILES,
    PREDICTIONS_FILE,
    StageDir,
    atomic_write,
    file_digest,
    fingerprint,
)
from patchcore_core.data import CategoryListing, list_category, load_masks
from patchcore_core.errors import DataError
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime, configure_threads
from patchcore_core.scoring import score_stream
from patchcore_core.stages.extract import SplitFeatures, relpath
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult

__all__ = ["ScoreResult", "run", "score_part", "merge", "stage_dir", "write_scores", "PREDICTION_COLUMNS"]

# The one column schema of predictions.parquet, in test-listing order.
PREDICTION_COLUMNS = ("image_index", "path", "relpath", "label", "defect_type", "score")


class ScoreResult(BaseModel):
    """Test-split scores: predictions.parquet, anomaly_maps.npy, gt_masks.npy (test-listing order)."""

    directory: str
    category: str
    predictions: str
    maps: str
    masks: str
    n_images: int
    fingerprint: str
    seconds_per_image: float = 0.0


def write_scores(out_dir: str | os.PathLike, listing: CategoryListing, scores: np.ndarray, maps: np.ndarray,
                 masks: np.ndarray) -> dict[str, Path]:
    """Write predictions.parquet (`PREDICTION_COLUMNS`), anomaly_maps.npy and gt_masks.npy, each atomically."""
    out = Path(out_dir)
    n = len(listing.test)
    table = pd.DataFrame({
        "image_index": np.arange(n, dtype=np.int32),
        "path": [s.path for s in listing.test],
        "relpath": [relpath(listing, s.path) for s in listing.test],
        "label": np.array([s.label for s in listing.test], np.int8),
        "defect_type": [s.defect_type for s in listing.test],
        "score": np.asarray(scores, np.float32),
    }, columns=list(PREDICTION_COLUMNS))
    with atomic_write(out / PREDICTIONS_FILE) as tmp:
        table.to_parquet(tmp, index=False)
    for name, array in ((MAPS_FILE, maps.astype(np.float32)), (MASKS_FILE, masks.astype(np.uint8))):
        with atomic_write(out / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    return {"predictions": out / PREDICTIONS_FILE, "maps": out / MAPS_FILE, "masks": out / MASKS_FILE}


def finish_scores(out: StageDir, listing: CategoryListing, scores: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray, seconds: float) -> ScoreResult:
    """Write the score artifacts into a stage folder and mark it complete."""
    paths = write_scores(out.path, listing, scores, maps, masks)
    n = len(listing.test)
    result = ScoreResult(directory=str(out.path), category=listing.category, n_images=n,
                         fingerprint=out.fingerprint, seconds_per_image=round(seconds / max(1, n), 6),
                         **{k: str(v) for k, v in paths.items()})
    out.finish(result.model_dump(), outputs=paths.values())
    return result


PARTS_DIR = "parts"


def stage_dir(model: ModelResult, test: SplitFeatures, work_dir: str | os.PathLike) -> StageDir:
    """The score folder of (these model bytes, these test features): the parts and the final artifacts."""
    files = [Path(model.model_dir) / f for f in MODEL_FILES]
    stamped = tuple((str(p), st.st_ino, st.st_size, st.st_mtime_ns) for p in files for st in [p.stat()])
    return StageDir.of(Path(work_dir) / "stages", test.category, "score",
                       fingerprint("score", _model_digest(stamped), test.fingerprint))


@functools.lru_cache(maxsize=8)
def _model_digest(stamped: tuple[tuple[str, int, int, int], ...]) -> str:
    """sha256 of a model's files, read once per process while they are unchanged (every score part asks)."""
    return file_digest(path for path, *_ in stamped)


@functools.lru_cache(maxsize=1)
def _load_detector(model_dir: str, stage_fingerprint: str, device: str):
    """A saved model, loaded once per process for all the score parts of a stage (keyed by its fingerprint)."""
    from patchcore_core.model import PatchCore

    return PatchCore.load(model_dir, device=None if device == "auto" else device)


def _detector(model: ModelResult, test: SplitFeatures, out: StageDir, runtime: Runtime):
    detector = _load_detector(model.model_dir, out.fingerprint, runtime.device)
    if runtime.num_threads is not None:
        configure_threads(runtime.num_threads)
    if tuple(detector.feature_grid_) != tuple(test.grid):
        raise ValueError(f"model grid {detector.feature_grid_} differs from the test features' grid {test.grid}")
    return detector


def _part_path(out: StageDir, index: int) -> Path:
    return out / PARTS_DIR / f"part-{index:05d}.parquet"


def _read_part(path: Path, fp: str) -> pa.Table | None:
    """A complete part written for this stage fingerprint, else None."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid):
        return None
    meta = json.loads((table.schema.metadata or {}).get(b"patchcore.score_part", b"{}"))
    return table if meta.get("fingerprint") == fp else None


def score_part(model: ModelResult, test: SplitFeatures, index: int, work_dir: str | os.PathLike,
               runtime: Runtime = DEFAULT_RUNTIME) -> str:
    """Score the images of test shard `index` into its Parquet part (image_index, score, map); reused if complete.

    The batches are the shard's row groups, the very batches `run` scores, so the parts hold the same bits.
    """
    out = stage_dir(model, test, work_dir)
    path = _part_path(out, index)
    if out.finished() is not None or _read_part(path, out.fingerprint) is not None:
        return str(path)
    detector = _detector(model, test, out, runtime)
    shard = test.shards[index]
    meta = shard_io.read_shard_metadata(shard)  # the footer only
    first, n = int(meta["first_image"]), int(meta["n_images"])
    start = time.perf_counter()
    batches = ((positions - first, feats) for positions, feats in shard_io.iter_image_batches([shard]))
    scores, maps = score_stream(batches, detector.score_patch_features, n, detector.image_size)
    seconds = time.perf_counter() - start
    table = pa.table(
        {"image_index": pa.array(np.arange(first, first + n, dtype=np.int32)), "score": pa.array(scores),
         "map": pa.FixedSizeListArray.from_arrays(pa.array(maps.reshape(-1)), maps[0].size)},
        metadata={b"patchcore.score_part": json.dumps({"fingerprint": out.fingerprint, "seconds": seconds,
                                                       "map_shape": list(maps.shape[1:])}).encode()})
    with atomic_write(path) as tmp:
        pq.write_table(table, tmp, compression="none")
    runtime.say(f"{test.category}: scored test shard {index} ({n} images)")
    return str(path)


def merge(model: ModelResult, test: SplitFeatures, fetched: FetchResult, work_dir: str | os.PathLike,
          runtime: Runtime = DEFAULT_RUNTIME) -> ScoreResult:
    """Assemble the parts of every test shard into the score artifacts, mark the stage complete, drop the parts."""
    out = stage_dir(model, test, work_dir)
    if (done := out.finished()) is not None:
        return ScoreResult(**done)
    listing = list_category(fetched.root, test.category)
    if len(listing.test) != test.n_images:
        raise DataError(f"{fetched.root}/{test.category}: {len(listing.test)} test images, shards hold "
                        f"{test.n_images}")
    # The crop settings come from the model's settings: loading its bank and index here would only read two ints.
    resize, size = model.params["resize"], model.params["image_size"]
    scores = np.empty(test.n_images, np.float32)
    maps = np.empty((test.n_images, size, size), np.float32)
    seconds = 0.0
    for index in range(len(test.shards)):
        table = _read_part(_part_path(out, index), out.fingerprint)
        if table is None:
            raise DataError(f"{test.category}: score part {_part_path(out, index)} is missing or incomplete")
        where = table.column("image_index").to_numpy()
        scores[where] = table.column("score").to_numpy()
        maps[where] = shard_io.embeddings_view(table.column("map")).reshape(-1, size, size)
        seconds += json.loads(table.schema.metadata[b"patchcore.score_part"])["seconds"]
    masks = load_masks(listing.test, resize, size)
    result = finish_scores(out, listing, scores, maps, masks, seconds)
    shutil.rmtree(out / PARTS_DIR, ignore_errors=True)
    return result


def run(model: ModelResult, test: SplitFeatures, fetched: FetchResult, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME) -> ScoreResult:
    """Score the test shards with a saved model: exactly what `PatchCore.predict` gives on the same images.

    One part per test shard, then the merge: the same `score_part` / `merge` a cluster runs as parallel tasks.
    """
    if (done := stage_dir(model, test, work_dir).finished()) is not None:
        return ScoreResult(**done)
    for index in range(len(test.shards)):
        score_part(model, test, index, work_dir, runtime)
    return merge(model, test, fetched, work_dir, runtime)
