"""PatchCore as restartable stages that exchange files, not tensors: extract → coreset → index → score → metrics.

Each stage reads its inputs from paths, writes its outputs atomically under a folder named by a fingerprint
of everything it was computed from (upstream fingerprints, its own settings, the library version), and
writes a `_SUCCESS.json` marker last. Calling a stage again with the same inputs returns the existing result
without recomputing it. Chained, the stages give exactly `PatchCore(**params).fit(train).predict(test)`.

The orchestration layer (`tasks/`, `flows/`) wraps one function of this module per task.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from patchcore_core import __version__
from patchcore_core import shards as shard_io
from patchcore_core.data import CategoryListing, list_category, load_images, load_masks
from patchcore_core.errors import DataError
from patchcore_core.fetch import read_manifest
from patchcore_core.io_utils import atomic_write

__all__ = [
    "STAGE_FORMAT_VERSION",
    "FEATURE_KEYS",
    "fingerprint",
    "SplitFeatures",
    "CoresetResult",
    "IndexResult",
    "ScoreResult",
    "MetricsResult",
    "extract_features",
    "select_coreset",
    "build_indices",
    "score_split",
    "evaluate_scores",
]

# Bump when a stage's output layout or meaning changes: it enters every fingerprint.
STAGE_FORMAT_VERSION = 1
# The PatchCore parameters patch features depend on (the rest only matter from the coreset stage on).
FEATURE_KEYS = ("backbone", "layers", "weights", "patch_size", "pretrain_dim", "target_dim", "resize", "image_size")
CORESET_KEYS = ("coreset_method", "coreset_ratio", "projection_dim", "seed")
DONE = "_SUCCESS.json"
_CASES = {"worst": "lowest-scored defects, highest-scored good images",
          "best": "highest-scored defects, lowest-scored good images"}
Log = Callable[[str], None] | None


def fingerprint(*parts: Any, length: int = 16) -> str:
    """Short sha256 of canonical JSON of `parts` plus the library and stage-format versions."""
    blob = json.dumps([__version__, STAGE_FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def _read_done(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / DONE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _finished(done: dict[str, Any] | None, fp: str, *paths: str | os.PathLike) -> bool:
    """True when a stage's marker has this fingerprint and every output it lists is still there."""
    return done is not None and done.get("fingerprint") == fp and all(Path(p).exists() for p in paths)


def _write_done(directory: Path, info: dict[str, Any]) -> None:
    with atomic_write(directory / DONE) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))


def _patchcore(params: dict[str, Any], device: str = "auto", num_threads: int | None = None):
    from patchcore_core.model import PatchCore

    return PatchCore(**dict(params, device=device, num_threads=num_threads, progress=False))


def _relpath(listing: CategoryListing, path: str) -> str:
    base = str(Path(listing.root) / listing.category) + os.sep
    return path[len(base) :].replace(os.sep, "/") if path.startswith(base) else path


# ============================================================================================== extract


@dataclass
class SplitFeatures:
    """The shards of one split: `shards` in image order; `n_reused` of them came from an earlier run."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def extract_features(
    data_root: str,
    category: str,
    manifest: str,
    params: dict[str, Any],
    features_base: str | os.PathLike,
    splits: Sequence[str] = ("train", "test"),
    images_per_shard: int = 32,
    images_per_row_group: int = 8,
    device: str = "auto",
    num_threads: int | None = None,
    dataset: str | None = None,
    log: Log = None,
) -> dict[str, SplitFeatures]:
    """Run the backbone over each split's images and write patch-feature shards (see `patchcore_core.shards`).

    The shards go under `<features_base>/<feature fingerprint>/dataset=<d>/category=<c>/split=<s>/`, where
    `dataset` names the data source (default: the folder name of `data_root`). A shard whose
    fingerprint (feature settings + the sha256 of each of its images, from the fetch manifest) matches is
    reused, so a run killed halfway resumes at the first missing shard.
    """
    listing = list_category(data_root, category)
    checksums = {rel: row["sha256"] for rel, row in read_manifest(manifest).items()}
    feature_params = {k: params.get(k) for k in FEATURE_KEYS}
    root = Path(features_base) / fingerprint("features", feature_params)
    dataset = dataset or Path(data_root).name
    model = None
    results: dict[str, SplitFeatures] = {}
    for split in splits:
        samples = listing.train if split == "train" else listing.test
        if not samples:
            raise DataError(f"{data_root}/{category} has no {split} images")
        rels = [_relpath(listing, s.path) for s in samples]
        missing = [r for r in rels if r not in checksums]
        if missing:
            raise DataError(f"{manifest} lists no checksum for {missing[:3]} (cache and manifest disagree)")
        split_fp = fingerprint("split", feature_params, [checksums[r] for r in rels])
        part_dir = shard_io.partition_dir(root, category, split, dataset)
        done = shard_io.read_success(part_dir)
        if _finished(done, split_fp, *(done or {}).get("result", {}).get("shards", [part_dir / "missing"])):
            results[split] = SplitFeatures(**{**done["result"], "n_reused": len(done["result"]["shards"]),
                                              "n_written": 0})
            continue
        paths, reused, written, grid, dim, patches = [], 0, 0, None, None, None
        for first in range(0, len(samples), images_per_shard):
            chunk = slice(first, first + images_per_shard)
            shard_fp = fingerprint("shard", feature_params, first, [checksums[r] for r in rels[chunk]])
            path = shard_io.shard_path(root, category, split, first // images_per_shard, dataset)
            if shard_io.shard_is_complete(path, shard_fp):
                meta = shard_io.read_shard_metadata(path)
                reused += 1
            else:
                if model is None:
                    model = _patchcore(params, device, num_threads)
                batches = list(model.iter_features([s.path for s in samples[chunk]]))
                grid_here = batches[-1][1]
                meta = {"fingerprint": shard_fp, "grid": list(grid_here), "relpaths": rels[chunk]}
                shard_io.write_shard(path, np.concatenate([b[0] for b in batches]), first, meta, images_per_row_group)
                meta = shard_io.read_shard_metadata(path)
                written += 1
                if log:
                    log(f"{category}/{split}: wrote {path.name} ({len(rels[chunk])} images)")
            grid, patches = meta["grid"], meta["patches_per_image"]
            dim = pq.read_schema(path).field("embedding").type.list_size
            paths.append(str(path))
        # Shards past the end belong to an older, longer listing: drop them so the partition is exact.
        for stale in part_dir.glob("part-*.parquet"):
            if str(stale) not in paths:
                stale.unlink()
        result = SplitFeatures(str(root), category, split, paths, len(samples), int(patches), int(dim),
                               [int(g) for g in grid], split_fp, reused, written)
        shard_io.write_success(part_dir, {"fingerprint": split_fp, "result": result.to_dict()})
        results[split] = result
    return results


# ============================================================================================== coreset


@dataclass
class CoresetResult:
    """The selected memory bank: `path` is coreset.parquet (global_index, image_index, patch_index, embedding)."""

    directory: str
    path: str
    n_train_patches: int
    n_selected: int
    dim: int
    grid: list[int]
    fingerprint: str
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def select_coreset(
    train: SplitFeatures,
    params: dict[str, Any],
    out_base: str | os.PathLike,
    device: str = "auto",
    num_threads: int | None = None,
    log: Log = None,
) -> CoresetResult:
    """Greedy (or random / all) coreset selection over the train shards, holding one row group at a time
    plus the projected bank [N, projection_dim]; the selected full-dimension rows are gathered in a second pass.
    """
    from patchcore_core.coreset_shards import select_from_shards

    config = {k: params.get(k) for k in CORESET_KEYS}
    fp = fingerprint("coreset", config, train.fingerprint)
    out = Path(out_base) / train.category / f"coreset-{fp}"
    done = _read_done(out)
    if _finished(done, fp, out / "coreset.parquet"):
        return CoresetResult(**done["result"])
    start = time.perf_counter()
    selected, bank, meta = select_from_shards(train.shards, config, device=device, num_threads=num_threads)
    n_total = shard_io.count_rows(train.shards)
    per_image = train.patches_per_image
    table = pa.table(
        {
            "global_index": pa.array(selected, pa.int64()),
            "image_index": pa.array((selected // per_image).astype(np.int32)),
            "patch_index": pa.array((selected % per_image).astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(bank.reshape(-1), pa.float32()), bank.shape[1]),
        },
        metadata={b"patchcore.coreset": json.dumps({**config, **meta, "fingerprint": fp}).encode()},
    )
    with atomic_write(out / "coreset.parquet") as tmp:
        pq.write_table(table, tmp, compression={"global_index": "zstd", "image_index": "zstd",
                                                "patch_index": "zstd", "embedding": "none"})
    result = CoresetResult(str(out), str(out / "coreset.parquet"), int(n_total), int(len(selected)),
                           int(bank.shape[1]), list(train.grid), fp, round(time.perf_counter() - start, 3))
    _write_done(out, {"fingerprint": fp, "result": result.to_dict()})
    if log:
        log(f"{train.category}: coreset of {len(selected)} / {n_total} patches ({config['coreset_method']})")
    return result


def read_coreset(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(global indices [k], memory bank [k, D]) of a coreset.parquet."""
    table = pq.read_table(path, columns=["global_index", "embedding"])
    return table.column("global_index").to_numpy(), shard_io._embeddings_view(table.column("embedding")).copy()


# ============================================================================================== index


@dataclass
class IndexResult:
    """One saved PatchCore model folder per index kind (config.json + memory_bank.npy + index.faiss)."""

    directory: str
    models: dict[str, str]
    primary: str
    fingerprint: str
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def model_dir(self) -> str:
        return self.models[self.primary]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_indices(
    coreset: CoresetResult,
    params: dict[str, Any],
    kinds: Sequence[str],
    out_base: str | os.PathLike,
    category: str,
    device: str = "auto",
    num_threads: int | None = None,
) -> IndexResult:
    """Build a faiss index of each kind over the coreset and save each as a complete PatchCore model folder.

    The first kind is the primary one (scored and registered); `params["index"]` is overridden per kind.
    """
    kinds = list(dict.fromkeys(kinds)) or [params.get("index", "flat")]
    fp = fingerprint("index", params, kinds, coreset.fingerprint)
    out = Path(out_base) / category / f"index-{fp}"
    done = _read_done(out)
    if _finished(done, fp, *(out / f"model-{kind}" / "index.faiss" for kind in kinds)):
        return IndexResult(**done["result"])
    _, bank = read_coreset(coreset.path)
    models = {}
    for kind in kinds:
        model = _patchcore(dict(params, index=kind), device, num_threads)
        model.fit_memory_bank(bank, tuple(coreset.grid), coreset.n_train_patches)
        models[kind] = str(model.save(out / f"model-{kind}"))
    result = IndexResult(str(out), models, kinds[0], fp, dict(params, index=kinds[0]))
    _write_done(out, {"fingerprint": fp, "result": result.to_dict()})
    return result


# ============================================================================================== score


@dataclass
class ScoreResult:
    """Test-split scores: predictions.parquet (path, label, defect_type, score), anomaly_maps.npy, gt_masks.npy."""

    directory: str
    predictions: str
    maps: str
    masks: str
    n_images: int
    fingerprint: str
    seconds_per_image: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def score_split(
    model_dir: str,
    test: SplitFeatures,
    data_root: str,
    out_base: str | os.PathLike,
    device: str = "auto",
    num_threads: int | None = None,
) -> ScoreResult:
    """Score the test shards with a saved model: image scores and anomaly maps, exactly as `predict` would."""
    from patchcore_core.model import PatchCore
    from patchcore_core.scoring import anomaly_maps

    config = json.loads((Path(model_dir) / "config.json").read_text())
    fp = fingerprint("score", config["params"], config["state"], _model_digest(model_dir), test.fingerprint)
    out = Path(out_base) / test.category / f"score-{fp}"
    done = _read_done(out)
    if _finished(done, fp, out / "predictions.parquet", out / "anomaly_maps.npy", out / "gt_masks.npy"):
        return ScoreResult(**done["result"])
    model = PatchCore.load(model_dir, device=None if device == "auto" else device)
    if num_threads is not None:
        from patchcore_core.runtime import configure_threads

        configure_threads(num_threads)
    if tuple(model.feature_grid_) != tuple(test.grid):
        raise ValueError(f"model grid {model.feature_grid_} differs from the test features' grid {test.grid}")
    listing = list_category(data_root, test.category)
    if len(listing.test) != test.n_images:
        raise DataError(f"{data_root}/{test.category}: {len(listing.test)} test images, shards hold {test.n_images}")
    scores = np.empty(test.n_images, np.float32)
    maps = np.empty((test.n_images, model.image_size, model.image_size), np.float32)
    start = time.perf_counter()
    for image_index, feats in shard_io.iter_image_batches(test.shards):
        batch_scores, grids = model.score_features(feats)
        scores[image_index] = batch_scores
        maps[image_index] = anomaly_maps(grids, model.image_size)
    elapsed = time.perf_counter() - start
    return _write_scores(out, fp, listing, scores, maps, load_masks(listing.test, model.resize, model.image_size),
                         elapsed)


def _write_scores(out: Path, fp: str, listing: CategoryListing, scores: np.ndarray, maps: np.ndarray,
                  masks: np.ndarray, elapsed: float) -> ScoreResult:
    """Write predictions.parquet, anomaly_maps.npy and gt_masks.npy (test-listing order), then the marker."""
    n = len(listing.test)
    table = pd.DataFrame(
        {
            "image_index": np.arange(n, dtype=np.int32),
            "relpath": [_relpath(listing, s.path) for s in listing.test],
            "label": np.array([s.label for s in listing.test], np.int8),
            "defect_type": [s.defect_type for s in listing.test],
            "score": scores.astype(np.float32),
        }
    )
    with atomic_write(out / "predictions.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    for name, array in (("anomaly_maps.npy", maps.astype(np.float32)), ("gt_masks.npy", masks.astype(np.uint8))):
        with atomic_write(out / name) as tmp, open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    result = ScoreResult(str(out), str(out / "predictions.parquet"), str(out / "anomaly_maps.npy"),
                         str(out / "gt_masks.npy"), n, fp, round(elapsed / max(1, n), 6))
    _write_done(out, {"fingerprint": fp, "result": result.to_dict()})
    return result


def _model_digest(model_dir: str | os.PathLike) -> str:
    """sha256 of a model folder's files, so a different model with equal settings never reuses scores."""
    digest = hashlib.sha256()
    for name in ("config.json", "memory_bank.npy", "index.faiss"):
        with open(Path(model_dir) / name, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


# ============================================================================================== metrics


@dataclass
class MetricsResult:
    """`metrics` as in `patchcore_core.metrics.compute_metrics`, plus the figures written beside metrics.json."""

    directory: str
    metrics: dict[str, Any]
    metrics_path: str
    figures: dict[str, str]
    fingerprint: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_scores(
    scores: ScoreResult,
    data_root: str,
    category: str,
    out_base: str | os.PathLike,
    image_size: int,
    resize: int | None,
    n_cases: int = 3,
    title: str = "",
) -> MetricsResult:
    """Metrics (image/pixel AUROC, AU-PRO, F1 threshold, ...), ROC/PR and PRO figures, and heatmap overlays of
    the worst and best cases. metrics.json is written last."""
    from patchcore_core.metrics import compute_metrics, plot_pro_curve, plot_roc_pr
    from patchcore_core.overlays import plot_overlays, select_cases

    fp = fingerprint("metrics", scores.fingerprint, n_cases, title)
    out = Path(out_base) / category / f"metrics-{fp}"
    done = _read_done(out)
    if _finished(done, fp, out / "metrics.json", *(done or {}).get("result", {}).get("figures", {}).values()):
        return MetricsResult(**done["result"])
    preds = pd.read_parquet(scores.predictions)
    maps = np.load(scores.maps, mmap_mode="r", allow_pickle=False)
    masks = np.load(scores.masks, mmap_mode="r", allow_pickle=False)
    labels, values = preds["label"].to_numpy(), preds["score"].to_numpy()
    metrics = compute_metrics(labels, values, masks, maps)
    metrics.update(category=category, n_test=int(len(preds)), n_anomalous=int(labels.sum()),
                   predict_seconds_per_image=scores.seconds_per_image)
    title = title or category
    figures = {
        "roc_pr": str(plot_roc_pr(labels, values, out / "roc_pr.png", title=title)),
        "pro_curve": str(plot_pro_curve(masks, maps, out / "pro_curve.png", title=f"{title}: PRO")),
    }
    cases = select_cases(labels, values, n_cases)
    root = Path(data_root) / category
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    for name, idx in cases.items():
        images = load_images([str(root / preds["relpath"][i]) for i in idx], resize=resize, image_size=image_size)
        captions = [f"{preds['defect_type'][i]} {values[i]:.3f}" for i in idx]
        figures[f"overlays_{name}"] = str(
            plot_overlays(images.numpy(), maps[idx], masks[idx], captions, out / f"overlays_{name}.png",
                          vmin=vmin, vmax=vmax, title=f"{title}: {name} cases ({_CASES[name]}; caption = score)")
        )
    with atomic_write(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    result = MetricsResult(str(out), metrics, str(out / "metrics.json"), figures, fp)
    _write_done(out, {"fingerprint": fp, "result": result.to_dict()})
    return result


# ============================================================================================== baselines


def fit_score_baseline(
    method: str,
    params: dict[str, Any],
    data_root: str,
    category: str,
    data_digest: str,
    out_base: str | os.PathLike,
    device: str = "auto",
    num_threads: int | None = None,
) -> tuple[str, ScoreResult]:
    """SPADE or PaDiM in one stage: fit on the train split, save the model, score the test split.

    The baselines keep no patch bank worth sharding, so extract/coreset/index collapse into this one step;
    its outputs (model folder, predictions.parquet, anomaly_maps.npy, gt_masks.npy) match `score_split`'s.
    """
    from patchcore_core.baselines import make_detector

    fp = fingerprint("baseline", method, params, category, data_digest)
    out = Path(out_base) / category / f"baseline-{method}-{fp}"
    done = _read_done(out)
    if _finished(done, fp, out / "predictions.parquet", out / "anomaly_maps.npy", out / "gt_masks.npy", out / "model"):
        return str(out / "model"), ScoreResult(**done["result"])
    listing = list_category(data_root, category)
    model = make_detector(method, strict=False, **dict(params, device=device, num_threads=num_threads,
                                                        progress=False))
    model.fit([s.path for s in listing.train])
    model.save(out / "model")
    start = time.perf_counter()
    scores, maps = model.predict([s.path for s in listing.test])
    elapsed = time.perf_counter() - start
    masks = load_masks(listing.test, model.resize, model.image_size)
    return str(out / "model"), _write_scores(out, fp, listing, scores, maps, masks, elapsed)
