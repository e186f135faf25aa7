"""Memory-bank subsampling: approximate greedy k-center coreset (PatchCore eq. 5), random, or none.

Baseline implementation: the GEMV-form per-step loop, O(N) memory. A faster selection with the same
indices replaces the inner loop (issue #5).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm


def jl_projection(features: np.ndarray | torch.Tensor, projection_dim: int, seed: int) -> np.ndarray:
    """Johnson–Lindenstrauss projection to `projection_dim` with a seeded N(0, 1/projection_dim) matrix.

    Features of at most `projection_dim` dims are returned unchanged (as float32).
    """
    x = torch.as_tensor(np.asarray(features), dtype=torch.float32)
    if x.shape[1] <= projection_dim:
        return x.numpy()
    gen = torch.Generator().manual_seed(seed)
    matrix = torch.randn(x.shape[1], projection_dim, generator=gen) / np.sqrt(projection_dim)
    return (x @ matrix).numpy()


def _start_indices(n: int, num_starts: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(n, size=min(num_starts, n), replace=False)


def reference_greedy_coreset(
    z: np.ndarray, k: int, num_starts: int = 10, seed: int = 0, progress: bool = False
) -> np.ndarray:
    """Plain GEMV-form greedy loop on already-projected `z`: c = argmax d; d = min(d, ‖z − z_c‖)."""
    z = torch.as_tensor(np.asarray(z), dtype=torch.float32)
    sq = (z * z).sum(1)
    starts = torch.as_tensor(_start_indices(len(z), num_starts, seed))
    d = torch.sqrt(torch.clamp(sq[:, None] - 2 * z @ z[starts].T + sq[starts][None], min=0)).mean(1)
    chosen = np.empty(k, dtype=np.int64)
    for step in tqdm(range(k), desc="coreset", disable=not progress, leave=False, mininterval=1.0):
        c = int(torch.argmax(d))
        chosen[step] = c
        dc = torch.sqrt(torch.clamp(sq - 2 * (z @ z[c]) + sq[c], min=0))
        d = torch.minimum(d, dc)
    return chosen


class GreedyCoresetSampler:
    """Approximate greedy k-center over JL-projected features; keeps k = int(N·ratio) rows (at least 1)."""

    def __init__(self, ratio: float, projection_dim: int = 128, num_starts: int = 10, seed: int = 0,
                 device: str = "cpu", dtype: str = "float32", progress: bool = True) -> None:
        if not 0 < ratio <= 1:
            raise ValueError(f"coreset ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self.projection_dim = projection_dim
        self.num_starts = num_starts
        self.seed = seed
        self.device = device
        self.dtype = dtype
        self.progress = progress

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        n = len(features)
        k = max(1, int(n * self.ratio))
        if k >= n:
            return np.arange(n, dtype=np.int64)
        z = jl_projection(features, self.projection_dim, self.seed)
        return reference_greedy_coreset(z, k, self.num_starts, self.seed, self.progress)


class RandomSampler:
    """Uniform random subsampling without replacement (the paper's ablation)."""

    def __init__(self, ratio: float, seed: int = 0, **_: object) -> None:
        self.ratio = ratio
        self.seed = seed

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        n = len(features)
        k = max(1, int(n * self.ratio))
        return np.sort(np.random.default_rng(self.seed).choice(n, size=min(k, n), replace=False)).astype(np.int64)


class IdentitySampler:
    """Keep the whole memory bank."""

    def __init__(self, *_: object, **__: object) -> None:
        pass

    def select(self, features: np.ndarray | torch.Tensor) -> np.ndarray:
        return np.arange(len(features), dtype=np.int64)


def make_sampler(method: str, ratio: float, **kwargs):
    """"greedy" | "random" | "none" → a sampler with `select(features) -> indices`."""
    if method == "greedy":
        return GreedyCoresetSampler(ratio, **kwargs)
    if method == "random":
        return RandomSampler(ratio, seed=kwargs.get("seed", 0))
    if method == "none":
        return IdentitySampler()
    raise ValueError(f"coreset method must be 'greedy', 'random' or 'none', got {method!r}")
