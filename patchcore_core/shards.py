"""Patch-feature shards: Parquet files of `FixedSizeList<float32>` embeddings, hive-partitioned, read zero-copy.

Layout under a feature root (one root per feature configuration)::

    <root>/[dataset=<dataset>/]category=<category>/split=<split>/part-00000.parquet
    <root>/[dataset=<dataset>/]category=<category>/split=<split>/_SUCCESS.json  (the extract stage's marker)

One row per patch, in image order then patch (row-major grid) order, exactly the order of
`PatchCore.iter_features`. Columns: `image_index` int32 (position in the split listing), `patch_index` int32,
`embedding` fixed_size_list<float32>[D]. A shard holds whole images and each row group holds whole images,
so a row group reshapes to [images, h*w, D] without crossing files. `dataset`/`category`/`split` live in
the folder names (hive partitioning) and come back as columns through `pyarrow.dataset`.

Every shard is written under a temporary name and renamed, so a shard that exists is complete; its
key-value metadata carries a fingerprint of what it was computed from, so a rerun can reuse it safely.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from patchcore_core.artifacts import atomic_write

__all__ = [
    "ShardInfo",
    "partition_dir",
    "shard_path",
    "embedding_schema",
    "write_shard",
    "read_shard_metadata",
    "shard_is_complete",
    "iter_row_groups",
    "iter_image_batches",
    "embeddings_view",
    "read_embeddings",
    "count_rows",
    "count_dim",
    "open_dataset",
]

META_KEY = b"patchcore.shard"


@dataclass(frozen=True)
class ShardInfo:
    """What one shard holds: `n_images` whole images starting at `first_image` of the split listing."""

    path: str
    first_image: int
    n_images: int
    n_rows: int
    fingerprint: str


def partition_dir(root: str | os.PathLike, category: str, split: str, dataset: str | None = None) -> Path:
    """The hive partition folder of one category and split (under `dataset=<name>` when given)."""
    base = Path(root) / f"dataset={dataset}" if dataset else Path(root)
    return base / f"category={category}" / f"split={split}"


def shard_path(root: str | os.PathLike, category: str, split: str, index: int, dataset: str | None = None) -> Path:
    return partition_dir(root, category, split, dataset) / f"part-{index:05d}.parquet"


def embedding_schema(dim: int, metadata: dict[str, Any] | None = None) -> pa.Schema:
    fields = [
        pa.field("image_index", pa.int32(), nullable=False),
        pa.field("patch_index", pa.int32(), nullable=False),
        pa.field("embedding", pa.list_(pa.field("item", pa.float32(), nullable=False), dim), nullable=False),
    ]
    meta = {META_KEY: json.dumps(metadata, sort_keys=True).encode()} if metadata is not None else None
    return pa.schema(fields, metadata=meta)


def _embedding_array(features: np.ndarray) -> pa.FixedSizeListArray:
    """[rows, D] float32 → FixedSizeListArray sharing the numpy buffer (no copy)."""
    flat = pa.array(np.ascontiguousarray(features, dtype=np.float32).reshape(-1), type=pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, features.shape[1])


def write_shard(
    path: str | os.PathLike,
    features: np.ndarray,
    first_image: int,
    metadata: dict[str, Any],
    images_per_row_group: int = 8,
) -> ShardInfo:
    """Write patch features [n_images, P, D] as one shard, atomically (temp name + rename).

    `metadata` (JSON-serialisable, must include "fingerprint") is stored in the file's key-value metadata
    together with `first_image`, `n_images` and `patches_per_image`. Row groups hold
    `images_per_row_group` whole images, bounding the memory any reader needs for one group.
    """
    if features.ndim != 3:
        raise ValueError(f"features must be [n_images, patches, dim], got shape {features.shape}")
    if "fingerprint" not in metadata:
        raise ValueError("shard metadata needs a 'fingerprint'")
    n_images, patches, dim = features.shape
    meta = dict(metadata, first_image=int(first_image), n_images=int(n_images), patches_per_image=int(patches))
    schema = embedding_schema(dim, meta)
    image_index = np.repeat(np.arange(first_image, first_image + n_images, dtype=np.int32), patches)
    patch_index = np.tile(np.arange(patches, dtype=np.int32), n_images)
    table = pa.Table.from_arrays(
        [pa.array(image_index), pa.array(patch_index), _embedding_array(features.reshape(-1, dim))],
        schema=schema,
    )
    with atomic_write(path) as tmp:
        # Embeddings are near-incompressible floats: stored plain (no compression, dictionary or statistics).
        pq.write_table(
            table,
            tmp,
            row_group_size=max(1, images_per_row_group) * patches,
            compression={"image_index": "zstd", "patch_index": "zstd", "embedding": "none"},
            use_dictionary=["image_index"],
            write_statistics=["image_index", "patch_index"],
        )
    return ShardInfo(str(path), int(first_image), int(n_images), int(len(table)), str(metadata["fingerprint"]))


def read_shard_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON metadata `write_shard` stored in the file footer (reads only the footer)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a patch-feature shard (no {META_KEY.decode()} metadata)")
    return json.loads(raw)


def shard_is_complete(path: str | os.PathLike, fingerprint: str) -> bool:
    """True when `path` exists, is a readable shard, and was computed from the given fingerprint."""
    try:
        return read_shard_metadata(path).get("fingerprint") == fingerprint
    except (OSError, ValueError, pa.ArrowException):
        return False


def embeddings_view(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """A read-only [rows, D] float32 numpy view of an embedding column (zero-copy for one chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    dim = column.type.list_size
    values = column.flatten()  # honours slicing offsets, unlike `.values`
    return values.to_numpy(zero_copy_only=True).reshape(-1, dim)


def iter_row_groups(
    paths: Sequence[str | os.PathLike], columns: Sequence[str] = ("image_index", "embedding")
) -> Iterator[dict[str, np.ndarray]]:
    """Yield each row group of each shard in order as {column: numpy array}; embeddings as [rows, D] views.

    Only one row group is in memory at a time (plus what the caller keeps).
    """
    for path in paths:
        pf = pq.ParquetFile(path, memory_map=True)
        for i in range(pf.num_row_groups):
            table = pf.read_row_group(i, columns=list(columns))
            out: dict[str, np.ndarray] = {}
            for name in columns:
                col = table.column(name)
                if name == "embedding":
                    out[name] = embeddings_view(col)
                else:
                    chunk = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
                    out[name] = chunk.to_numpy(zero_copy_only=True)
            yield out


def iter_image_batches(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (image indices [b], features [b, P, D]) per row group: the layout `PatchCore.score_features` takes."""
    for group in iter_row_groups(paths, ("image_index", "patch_index", "embedding")):
        emb, img = group["embedding"], group["image_index"]
        patches = int(np.count_nonzero(img == img[0]))
        if len(img) % patches:
            raise ValueError(f"a row group of {paths} does not hold whole images")
        yield img[::patches].copy(), emb.reshape(-1, patches, emb.shape[1])


def count_rows(paths: Sequence[str | os.PathLike]) -> int:
    """Total number of patch rows in the shards (footer reads only)."""
    return sum(pq.ParquetFile(p).metadata.num_rows for p in paths)


def read_embeddings(paths: Sequence[str | os.PathLike], transform=None) -> np.ndarray:
    """All embeddings of the shards as one [rows, D] array, one row group at a time into a preallocated array.

    `transform` ([rows, D] → [rows, p], e.g. the coreset's JL projection) is applied per row group, so only the
    transformed matrix is ever held whole.
    """
    total = count_rows(paths)
    out: np.ndarray | None = None
    row = 0
    for group in iter_row_groups(paths, ("embedding",)):
        emb = group["embedding"]
        if transform is not None:
            with warnings.catch_warnings():  # torch warns once about wrapping a read-only (Arrow-backed) array
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                emb = np.asarray(transform(emb))
        if out is None:
            out = np.empty((total, emb.shape[1]), dtype=np.float32 if transform is None else emb.dtype)
        out[row : row + len(emb)] = emb
        row += len(emb)
    if out is None:
        raise ValueError("no shards (or only empty ones) to read")
    return out


def open_dataset(root: str | os.PathLike):
    """All shards under `root` as a `pyarrow.dataset.Dataset` with hive `category`/`split` columns."""
    import pyarrow.dataset as ds

    return ds.dataset(
        str(root),
        format="parquet",
        partitioning="hive",
        exclude_invalid_files=True,
        ignore_prefixes=[".", "_"],
    )


def count_dim(paths: Sequence[str | os.PathLike]) -> int:
    """The embedding dimension D of the shards (schema read only)."""
    return int(pq.read_schema(paths[0]).field("embedding").type.list_size)
