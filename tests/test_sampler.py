"""Coreset samplers: exact agreement of the fast greedy with the GEMV reference, coverage, sizes, contracts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore_core import sampler as S
from patchcore_core.errors import DataError


def clustered(n: int, dim: int, seed: int, clusters: int = 12) -> np.ndarray:
    """Gaussian mixture with uneven weights and spreads (float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    labels = rng.choice(clusters, size=n, p=rng.dirichlet(np.ones(clusters)))
    spread = rng.uniform(0.2, 1.0, size=clusters)[labels, None]
    return (centres[labels] + rng.standard_normal((n, dim)) * spread).astype(np.float32)


def radius(x: np.ndarray, idx: np.ndarray) -> float:
    """k-center objective: max over points of the distance to the nearest selected point (brute force)."""
    x = x.astype(np.float64)
    c = x[idx]
    d2 = (x * x).sum(1)[:, None] - 2 * x @ c.T + (c * c).sum(1)[None]
    return float(np.sqrt(np.maximum(d2, 0).min(1)).max())


def gonzalez(x: np.ndarray, k: int) -> np.ndarray:
    """Exact farthest-first traversal (Gonzalez 1985) from point 0 on the raw data."""
    x = x.astype(np.float64)
    d = np.full(len(x), np.inf)
    chosen, c = [], 0
    for _ in range(k):
        chosen.append(c)
        d = np.minimum(d, np.linalg.norm(x - x[c], axis=1))
        c = int(np.argmax(d))
    return np.array(chosen)


def torch_path(x: np.ndarray, k: int, seed: int, num_starts: int = 10) -> np.ndarray:
    """The GPU code path (exact float64 full scan), run on the CPU."""
    grid, _ = S.to_exact_grid(x)
    d0 = S._initial_state(torch.from_numpy(grid), S._start_indices(len(x), num_starts, seed))[0]
    return S._greedy_torch(torch.from_numpy(grid), k, d0, progress=False)[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_greedy_equals_gemv_reference(seed: int, dtype: type) -> None:
    x = clustered(3000, 64, seed).astype(dtype)
    chosen = S.GreedyCoresetSampler(0.1, seed=seed, progress=False).select(x)
    assert chosen.dtype == np.int64 and len(chosen) == 300
    z = S.jl_projection(x, 128, seed)  # D <= 128: unchanged, cast to float32 as `select` does
    np.testing.assert_array_equal(chosen, S.reference_greedy_coreset(z, 300, num_starts=10, seed=seed))


def test_projected_selection_equals_reference_and_gpu_path() -> None:
    x = clustered(2000, 256, seed=5)
    sampler = S.GreedyCoresetSampler(0.1, projection_dim=32, seed=3, progress=False)
    z = S.jl_projection(x, 32, 3)
    assert z.shape == (2000, 32)
    chosen = sampler.select(x)
    np.testing.assert_array_equal(chosen, S.reference_greedy_coreset(z, 200, seed=3))
    np.testing.assert_array_equal(chosen, torch_path(z, 200, seed=3))
    np.testing.assert_array_equal(chosen, sampler.select(torch.from_numpy(x)))  # tensors are accepted


def test_ties_duplicates_and_exhausted_points_match_reference() -> None:
    # 400 rows drawn from 30 lattice points: many exactly equal distances, and k > #distinct points,
    # after which every d is 0 and argmax picks index 0 again (as np.argmax / torch.argmax do).
    rng = np.random.default_rng(0)
    lattice = rng.integers(-2, 3, size=(30, 8)).astype(np.float32)
    x = lattice[rng.integers(0, 30, size=400)]
    for seed in range(3):
        chosen = S.GreedyCoresetSampler(0.5, seed=seed, progress=False).select(x)
        reference = S.reference_greedy_coreset(x, 200, seed=seed)
        np.testing.assert_array_equal(chosen, reference)
        np.testing.assert_array_equal(chosen, torch_path(x, 200, seed))
        assert len(np.unique(x[chosen[:40]], axis=0)) == len(np.unique(x, axis=0))
        assert (chosen[60:] == 0).all()


def test_grid_distances_are_bitwise_equal_in_any_summation_order() -> None:
    grid, _ = S.to_exact_grid(clustered(500, 128, seed=1) * 7.3)
    z = grid.astype(np.float64)
    sq = (z * z).sum(1)
    c = z[17]
    gemv = sq - 2.0 * (z @ c) + sq[17]
    diff = ((z - c) ** 2).sum(1)
    reversed_order = np.zeros(len(z))
    for j in reversed(range(z.shape[1])):
        reversed_order += (z[:, j] - c[j]) ** 2
    gpu_style = (torch.from_numpy(z) - torch.from_numpy(c)).pow(2).sum(1).numpy()
    for other in (diff, reversed_order, gpu_style):
        np.testing.assert_array_equal(gemv, other)


def test_exact_grid_is_idempotent_and_close() -> None:
    x = clustered(300, 64, seed=2) * 1e-3
    grid, scale = S.to_exact_grid(x)
    again, scale2 = S.to_exact_grid(grid * scale)
    np.testing.assert_array_equal(grid, again)
    assert scale == scale2
    assert np.abs(grid * scale - x).max() <= scale * 2.0 ** -S.grid_bits(64)


def test_coverage_close_to_exact_gonzalez_and_reported_radius() -> None:
    # Measured on such data (N=3000, D=64, 10 %): 0.998-1.009 x Gonzalez's radius; the bound stated is 1.05.
    for seed in range(2):
        x = clustered(3000, 64, seed)
        sampler = S.GreedyCoresetSampler(0.1, seed=seed, progress=False)
        chosen = sampler.select(x)
        ours = radius(x, chosen)
        assert ours <= 1.05 * radius(x, gonzalez(x, 300))
        assert sampler.coverage_radius_ == pytest.approx(ours, rel=1e-5)  # grid rounding only
        assert sampler.min_distances_.shape == (3000,) and (sampler.min_distances_[chosen] == 0).all()


def test_random_sampler_covers_a_clustered_bank_worse() -> None:
    rng = np.random.default_rng(0)
    big = rng.standard_normal((2900, 16))
    small = np.repeat(rng.standard_normal((10, 16)) * 20, 10, axis=0) + rng.standard_normal((100, 16)) * 0.1
    x = np.concatenate([big, small]).astype(np.float32)
    greedy = radius(x, S.GreedyCoresetSampler(0.05, progress=False).select(x))
    random = radius(x, S.RandomSampler(0.05, seed=0).select(x))
    assert random > 1.5 * greedy


def test_determinism_prefixes_and_sizes() -> None:
    x = clustered(1500, 32, seed=4)
    a = S.GreedyCoresetSampler(0.2, seed=7, progress=False).select(x)
    np.testing.assert_array_equal(a, S.GreedyCoresetSampler(0.2, seed=7, progress=False).select(x))
    assert not np.array_equal(a, S.GreedyCoresetSampler(0.2, seed=8, progress=False).select(x))
    small = S.GreedyCoresetSampler(0.05, seed=7, progress=False).select(x)
    np.testing.assert_array_equal(small, a[: len(small)])  # greedy is incremental: selection order
    for n, ratio in [(1500, 0.1), (999, 0.25), (1000, 0.001), (7, 0.01)]:
        assert len(S.GreedyCoresetSampler(ratio, progress=False).select(x[:n])) == max(1, int(n * ratio))
        r = S.RandomSampler(ratio, seed=1).select(x[:n])
        assert len(r) == len(np.unique(r)) == max(1, int(n * ratio))
    np.testing.assert_array_equal(S.GreedyCoresetSampler(1.0).select(x), np.arange(1500))
    np.testing.assert_array_equal(S.IdentitySampler().select(x), np.arange(1500))
    assert len(np.unique(a)) == len(a)


def test_state_memory_is_linear_in_n() -> None:
    if not S.HAVE_NUMBA:
        pytest.skip("numba kernel not installed")
    n, dim, k = 20000, 32, 2000
    grid, _ = S.to_exact_grid(clustered(n, dim, seed=0))
    starts = S._start_indices(n, 10, 0)
    d0, r0, a0 = (t.numpy() for t in S._initial_state(torch.from_numpy(grid), starts))
    state = S._pruned_init(grid, d0, r0, a0, starts, k)
    total = sum(a.nbytes for a in state)
    assert total <= 2.0 * grid.nbytes + 100 * n + (k + 10) * (dim * 4 + 100)  # no N×N, no N×k


def test_make_sampler_and_validation() -> None:
    assert isinstance(S.make_sampler("greedy", 0.1, seed=1, device="cpu"), S.GreedyCoresetSampler)
    assert isinstance(S.make_sampler("random", 0.1, seed=1), S.RandomSampler)
    assert isinstance(S.make_sampler("none", 0.1), S.IdentitySampler)
    with pytest.raises(ValueError, match="coreset method"):
        S.make_sampler("kmeans", 0.1)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            S.GreedyCoresetSampler(bad)
    x = np.ones((50, 4), np.float32)
    x[3, 1] = np.nan
    with pytest.raises(DataError, match="NaN"):
        S.GreedyCoresetSampler(0.1, progress=False).select(x)
    with pytest.raises(DataError, match="empty"):
        S.GreedyCoresetSampler(0.1).select(np.zeros((0, 4), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        S.GreedyCoresetSampler(0.1, dtype="float16", progress=False).select(np.ones((50, 4), np.float32))
