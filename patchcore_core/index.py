"""Nearest-neighbour search over the memory bank through faiss: exact Flat or approximate IVFPQ, CPU or GPU."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np

from patchcore_core.artifacts import atomic_write

INDEX_KINDS = ("flat", "ivfpq")


def faiss_gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _pq_subquantizers(dim: int, wanted: int) -> int:
    """The largest divisor of `dim` not above `wanted` (faiss PQ needs dim % m == 0)."""
    for m in range(min(wanted, dim), 0, -1):
        if dim % m == 0:
            return m
    return 1


class NearestNeighbourIndex:
    """A faiss index over the bank; `search` is chunked so peak memory stays bounded for any query count.

    `kind="flat"`: exact L2 (IndexFlatL2). `kind="ivfpq"`: inverted lists + product quantisation (§4.3),
    with `nlist` cells (default ≈ √N·4, capped so each cell gets ≥ 39 training points), `pq_m` sub-quantisers
    of `pq_bits` bits, searching `nprobe` cells. Distances are squared L2, as faiss returns them.
    """

    def __init__(
        self,
        kind: str = "flat",
        device: str = "cpu",
        nlist: int | None = None,
        pq_m: int = 64,
        pq_bits: int = 8,
        nprobe: int = 16,
        chunk_size: int = 16384,
        seed: int = 0,
    ) -> None:
        if kind not in INDEX_KINDS:
            raise ValueError(f"index must be one of {INDEX_KINDS}, got {kind!r}")
        self.kind = kind
        self.device = str(device)
        self.nlist = nlist
        self.pq_m = pq_m
        self.pq_bits = pq_bits
        self.nprobe = nprobe
        self.chunk_size = chunk_size
        self.seed = seed

    def _build_cpu(self, bank: np.ndarray) -> faiss.Index:
        n, dim = bank.shape
        if self.kind == "flat":
            index = faiss.IndexFlatL2(dim)
            index.add(bank)
            return index
        nlist = self.nlist or int(np.clip(4 * np.sqrt(n), 1, max(1, n // 39)))
        bits = self.pq_bits if n >= 2**self.pq_bits * 39 else max(1, int(np.log2(max(2, n // 39))))
        index = faiss.IndexIVFPQ(faiss.IndexFlatL2(dim), dim, nlist, _pq_subquantizers(dim, self.pq_m), bits)
        index.cp.seed = self.seed
        index.pq.cp.seed = self.seed
        index.train(bank)
        index.add(bank)
        index.nprobe = min(self.nprobe, nlist)
        return index

    def fit(self, bank: np.ndarray) -> NearestNeighbourIndex:
        """Index the bank [k, D] (float32)."""
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        if bank.ndim != 2 or len(bank) == 0:
            raise ValueError(f"bank must be a non-empty [k, D] array, got shape {bank.shape}")
        self.dim_ = bank.shape[1]
        self.ntotal_ = bank.shape[0]
        self.index_ = self._to_device(self._build_cpu(bank))
        return self

    def _to_device(self, index: faiss.Index) -> faiss.Index:
        if not self.device.startswith("cuda") or not faiss_gpu_available():
            return index
        self._gpu_resources = faiss.StandardGpuResources()
        gpu_id = int(self.device.split(":")[1]) if ":" in self.device else 0
        return faiss.index_cpu_to_gpu(self._gpu_resources, gpu_id, index)

    def _cpu_index(self) -> faiss.Index:
        if hasattr(faiss, "index_gpu_to_cpu") and faiss_gpu_available() and self.device.startswith("cuda"):
            return faiss.index_gpu_to_cpu(self.index_)
        return self.index_

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Squared L2 distances [M, k] and bank ids [M, k] of each query's k nearest bank rows."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal_)
        dists = np.empty((len(queries), k), dtype=np.float32)
        ids = np.empty((len(queries), k), dtype=np.int64)
        for start in range(0, len(queries), self.chunk_size):
            stop = start + self.chunk_size
            dists[start:stop], ids[start:stop] = self.index_.search(queries[start:stop], k)
        return dists, ids

    def holds(self, bank: np.ndarray) -> bool | None:
        """Whether this index holds exactly `bank` (exact indices only; None when the index is approximate)."""
        if self.kind != "flat":
            return None
        if (self.ntotal_, self.dim_) != tuple(bank.shape):
            return False
        return bool(np.array_equal(self._cpu_index().reconstruct_n(0, self.ntotal_), bank))

    def save(self, path: str | os.PathLike) -> None:
        """Serialise with faiss's own format (no pickle), atomically."""
        with atomic_write(path) as tmp:
            faiss.write_index(self._cpu_index(), str(tmp))

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", **kwargs) -> NearestNeighbourIndex:
        index = faiss.read_index(str(Path(path)))
        kind = "ivfpq" if isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ) else "flat"
        self = cls(kind=kind, device=device, **kwargs)
        self.dim_, self.ntotal_ = index.d, index.ntotal
        self.index_ = self._to_device(index)
        return self
