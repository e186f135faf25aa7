"""Coreset selection over Parquet feature shards without holding the full-dimension bank in memory.

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

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from patchcore_core import sampler as sampler_lib
from patchcore_core import shards as shard_io

__all__ = ["project_shards", "gather_rows", "select_from_shards"]


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
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(selected global indices [k] in selection order, memory bank [k, D], info) for the coreset settings
    `config` (coreset_method, coreset_ratio, projection_dim, seed), matching `PatchCore.fit_features`."""
    from patchcore_core.runtime import configure_threads, resolve_device

    if num_threads is not None:
        configure_threads(num_threads)
    dev = str(resolve_device(device))
    method = config["coreset_method"]
    n = shard_io.count_rows(paths)
    sampler = sampler_lib.make_sampler(method, config["coreset_ratio"], projection_dim=config["projection_dim"],
                                       seed=config["seed"], device=dev, progress=False)
    info: dict[str, Any] = {"method": method, "n_rows": int(n)}
    if method == "greedy":
        projection_dim, seed = int(config["projection_dim"]), int(config["seed"])
        dtype = getattr(sampler, "dtype", "float32")  # project exactly as the sampler itself would
        extra = {} if dtype == "float32" else {"dtype": dtype}
        projected = project_shards(paths, lambda rows: sampler_lib.jl_projection(rows, projection_dim, seed, **extra))
        if projected.shape[1] > projection_dim:  # jl_projection's contract; checked, never assumed
            raise ValueError(f"jl_projection returned {projected.shape[1]} > {projection_dim} columns")
        info["projected_dim"] = int(projected.shape[1])
        selected = np.asarray(sampler.select(projected), dtype=np.int64)
    else:
        selected = np.asarray(sampler.select(_RowCount(n)), dtype=np.int64)
    return selected, gather_rows(paths, selected), info


class _RowCount:
    """Stands in for a bank of `n` rows for samplers that only need its length (random, identity)."""

    def __init__(self, n: int) -> None:
        self.shape = (n, 0)

    def __len__(self) -> int:
        return self.shape[0]
