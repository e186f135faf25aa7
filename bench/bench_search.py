"""Nearest-neighbour search benchmark: faiss Flat and IVFPQ against the machine's GEMM floor, in one run.

Screw-sized by default: 125,440 queries (160 test images × 784 patches) against a 25,088-row bank.
The floor is the time of the bare matrix product queries·bankᵀ at the GEMM rate measured in the same run.
Writes bench/results/search.md.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import numpy as np
import torch

from patchcore_core.index import NearestNeighbourIndex
from patchcore_core.runtime import configure_threads

REPO = Path(__file__).resolve().parents[1]


def gemm_gflops(dim: int = 2048, repeats: int = 5) -> float:
    """Sustained float32 GEMM rate of this machine (torch matmul), in GFLOP/s."""
    a, b = torch.rand(dim, dim), torch.rand(dim, dim)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * dim**3 * repeats / (time.perf_counter() - start) / 1e9


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Patch-like synthetic features: a mixture of Gaussians."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(64, dim)).astype(np.float32) * 3
    return (centres[rng.integers(0, 64, n)] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queries", type=int, default=125_440)
    parser.add_argument("--bank", type=int, default=25_088)
    parser.add_argument("--dim", type=int, default=224, help="EfficientNet-Lite0 default target dim")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "search.md"))
    args = parser.parse_args()
    configure_threads(args.threads)
    bank, queries = clustered(args.bank, args.dim, 0), clustered(args.queries, args.dim, 1)
    rate = gemm_gflops()
    floor = 2 * args.queries * args.bank * args.dim / rate / 1e9
    rows = []
    flat_t, (flat_d, flat_i) = timed(lambda: NearestNeighbourIndex("flat").fit(bank).search(queries, 1))
    rows.append(("faiss Flat (exact)", flat_t, 1.0))
    for nprobe in (8, 32):
        index = NearestNeighbourIndex("ivfpq", nprobe=nprobe).fit(bank)
        t, (_, ids) = timed(lambda index=index: index.search(queries, 1))
        rows.append((f"faiss IVFPQ nprobe={nprobe} (search only)", t, float((ids[:, 0] == flat_i[:, 0]).mean())))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        "# Nearest-neighbour search vs the GEMM floor",
        "",
        f"`python bench/bench_search.py --queries {args.queries} --bank {args.bank} --dim {args.dim} "
        f"--threads {args.threads}`; load average before: {os.getloadavg()[0]:.2f}",
        "",
        f"- GEMM rate measured in this run: {rate:.1f} GFLOP/s ({args.threads} threads)",
        f"- floor for {args.queries:,} × {args.bank:,} × {args.dim}: {floor:.2f} s",
        f"- peak RSS of the run: {rss:.0f} MiB",
        "",
        "| method | seconds | × floor | recall@1 vs exact |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {t:.2f} | {t / floor:.2f} | {recall:.3f} |" for name, t, recall in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
