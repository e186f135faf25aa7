"""Stage 3, coreset: the memory bank selected from the train shards, without holding the full-dimension bank.

Greedy coreset (PatchCore §3.2) only needs the Johnson-Lindenstrauss projection of every patch feature:
pass 1 streams the shards one row group at a time and projects each group with `sampler.jl_projection`
([rows, D] → [rows, p], the same seeded matrix for every group); the sampler then selects on the projected
bank [N, p]; pass 2 streams the shards again and gathers the selected full-dimension rows. Peak memory: N·p
floats plus one row group, instead of N·D floats.

The sampler is called through its public `select`: `jl_projection` returns inputs of at most `projection_dim`
columns unchanged, so `sampler.select(projected)` runs exactly the selection `sampler.select(full_bank)`
runs, whatever its inner loop.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from patchcore_core import sampler as sampler_lib
from patchcore_core import shards as shard_io
from patchcore_core.artifacts import StageDir, atomic_write, fingerprint
from patchcore_core.config import DetectorParams
from patchcore_core.runtime import DEFAULT_RUNTIME, Runtime
from patchcore_core.stages.extract import SplitFeatures

__all__ = ["CoresetResult", "run", "read_coreset", "project_shards", "gather_rows", "select_from_shards"]

CORESET_FILE = "coreset.parquet"


class CoresetResult(BaseModel):
    """The selected memory bank: `path` is coreset.parquet (global_index, image_index, patch_index, embedding)."""

    directory: str
    category: str
    path: str
    n_train_patches: int
    n_selected: int
    dim: int
    grid: list[int]
    fingerprint: str
    seconds: float = 0.0


def run(train: SplitFeatures, params: DetectorParams, work_dir: str | os.PathLike,
        runtime: Runtime = DEFAULT_RUNTIME) -> CoresetResult:
    """Select the coreset of the train shards (the `coreset` settings) and write it as coreset.parquet."""
    config = params.stage_params("coreset")
    out = StageDir.of(Path(work_dir) / "stages", train.category, "coreset",
                      fingerprint("coreset", config, train.fingerprint))
    if (done := out.finished()) is not None:
        return CoresetResult(**done)
    start = time.perf_counter()
    selected, bank, meta = select_from_shards(train.shards, config, device=runtime.device,
                                              num_threads=runtime.num_threads)
    n_total, per_image = shard_io.count_rows(train.shards), train.patches_per_image
    table = pa.table(
        {
            "global_index": pa.array(selected, pa.int64()),
            "image_index": pa.array((selected // per_image).astype(np.int32)),
            "patch_index": pa.array((selected % per_image).astype(np.int32)),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(bank.reshape(-1), pa.float32()), bank.shape[1]),
        },
        metadata={b"patchcore.coreset": json.dumps({**config, **meta, "fingerprint": out.fingerprint}).encode()},
    )
    with atomic_write(out / CORESET_FILE) as tmp:
        pq.write_table(table, tmp, compression={"global_index": "zstd", "image_index": "zstd",
                                                "patch_index": "zstd", "embedding": "none"})
    result = CoresetResult(directory=str(out.path), category=train.category, path=str(out / CORESET_FILE),
                           n_train_patches=int(n_total), n_selected=int(len(selected)), dim=int(bank.shape[1]),
                           grid=list(train.grid), fingerprint=out.fingerprint,
                           seconds=round(time.perf_counter() - start, 3))
    out.finish(result.model_dump(), outputs=[result.path])
    runtime.say(f"{train.category}: coreset of {len(selected)} / {n_total} patches ({config['coreset_method']})")
    return result


def read_coreset(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(global indices [k], memory bank [k, D]) of a coreset.parquet."""
    table = pq.read_table(path, columns=["global_index", "embedding"])
    return table.column("global_index").to_numpy(), shard_io.embeddings_view(table.column("embedding")).copy()


def project_shards(paths: Sequence[str | os.PathLike], project) -> np.ndarray:
    """Apply `project` ([rows, D] → [rows, p]) to every row group of the shards; returns [N, p]."""
    return shard_io.read_embeddings(paths, transform=project)


def gather_rows(paths: Sequence[str | os.PathLike], indices: np.ndarray) -> np.ndarray:
    """Rows `indices` (global row numbers, any order, no duplicates needed) of the shards, in that order."""
    indices = np.asarray(indices, dtype=np.int64)
    order = np.argsort(indices, kind="stable")
    wanted = indices[order]
    out: np.ndarray | None = None
    start = 0
    pos = 0  # next position in `wanted`
    for group in shard_io.iter_row_groups(paths, ("embedding",)):
        emb = group["embedding"]
        stop = start + len(emb)
        end = np.searchsorted(wanted, stop, side="left")
        if out is None:
            out = np.empty((len(indices), emb.shape[1]), dtype=np.float32)
        if end > pos:
            out[order[pos:end]] = emb[wanted[pos:end] - start]
            pos = end
        start = stop
    if out is None or pos != len(indices):
        raise IndexError(f"indices exceed the {start} rows of the shards")
    return out


def select_from_shards(
    paths: Sequence[str | os.PathLike],
    config: dict[str, Any],
    device: str = "auto",
    num_threads: int | None = None,
    exclude_images: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(selected global indices [k] in selection order, memory bank [k, D], info) for the coreset settings
    `config` (coreset_method, coreset_ratio, projection_dim, seed), matching `PatchCore.fit_features`.

    `exclude_images` (image indices) leaves those images' rows out of the candidates, as calibration needs.
    """
    from patchcore_core.runtime import configure_threads, resolve_device

    if num_threads is not None:
        configure_threads(num_threads)
    dev = str(resolve_device(device))
    method = config["coreset_method"]
    keep = _rows_kept(paths, exclude_images)
    n = int(keep.sum())
    sampler = sampler_lib.make_sampler(method, config["coreset_ratio"], projection_dim=config["projection_dim"],
                                       seed=config["seed"], device=dev, progress=False)
    info: dict[str, Any] = {"method": method, "n_rows": int(n)}
    if method == "greedy":
        projection_dim, seed = int(config["projection_dim"]), int(config["seed"])
        dtype = getattr(sampler, "dtype", "float32")  # project exactly as the sampler itself would
        extra = {} if dtype == "float32" else {"dtype": dtype}
        projected = project_shards(paths, lambda rows: sampler_lib.jl_projection(rows, projection_dim, seed, **extra))
        projected = projected if n == len(keep) else projected[keep]  # the projection is row-wise: filter after
        if projected.shape[1] > projection_dim:  # jl_projection's contract; checked, never assumed
            raise ValueError(f"jl_projection returned {projected.shape[1]} > {projection_dim} columns")
        info["projected_dim"] = int(projected.shape[1])
        selected = np.asarray(sampler.select(projected), dtype=np.int64)
    else:
        selected = np.asarray(sampler.select(_RowCount(n)), dtype=np.int64)
    if n != len(keep):
        selected = np.flatnonzero(keep)[selected]  # candidate positions → global row numbers
    return selected, gather_rows(paths, selected), info


def _rows_kept(paths: Sequence[str | os.PathLike], exclude_images: np.ndarray | None) -> np.ndarray:
    """Boolean [N]: the rows whose image is not excluded (all rows when nothing is)."""
    if exclude_images is None or len(exclude_images) == 0:
        return np.ones(shard_io.count_rows(paths), dtype=bool)
    groups = [g["image_index"] for g in shard_io.iter_row_groups(paths, ("image_index",))]
    return ~np.isin(np.concatenate(groups), np.asarray(exclude_images))


class _RowCount:
    """Stands in for a bank of `n` rows for samplers that only need its length (random, identity)."""

    def __init__(self, n: int) -> None:
        self.shape = (n, 0)

    def __len__(self) -> int:
        return self.shape[0]
