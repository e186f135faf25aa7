"""Incremental memory bank (issue #10, item 6): exact greedy continuation and `PatchCore.extend`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from patchcore_core import PatchCore
from patchcore_core import sampler as S
from patchcore_core.errors import DataError
from patchcore_core.index import NearestNeighbourIndex

SIZE = 64


# ----------------------------------------------------------------------------------------- references
def brute_continue(selected: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force float64 farthest-point traversal of `candidates`, seeded with the `selected` set.

    Difference form ‖x − y‖ (no GEMM); argmax takes the first index on ties. Returns (indices, final d).
    """
    sel, cand = selected.astype(np.float64), candidates.astype(np.float64)
    d = np.array([np.sqrt(((sel - c) ** 2).sum(1)).min() for c in cand])
    chosen = []
    for _ in range(k):
        c = int(np.argmax(d))
        chosen.append(c)
        d = np.minimum(d, np.sqrt(((cand - cand[c]) ** 2).sum(1)))
    return np.array(chosen, dtype=np.int64), d


def on_grid(x: np.ndarray, step: float = 2.0**-8) -> np.ndarray:
    """Values on a coarse dyadic grid: the sampler's exact-grid snapping leaves them unchanged, so a plain float64
    reference on the raw values is exact too (every squared distance is an exact float64)."""
    return (np.round(x / step) * step).astype(np.float32)


def clustered(n: int, dim: int, seed: int, clusters: int = 8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)) * 3
    labels = rng.choice(clusters, size=n, p=rng.dirichlet(np.ones(clusters)))
    return (centres[labels] + rng.standard_normal((n, dim)) * rng.uniform(0.2, 1.0, clusters)[labels, None]).astype(
        np.float32)


# ------------------------------------------------------------------------------------- continue_greedy
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_continue_greedy_equals_brute_force_reference(seed: int) -> None:
    x = on_grid(clustered(1600, 48, seed))
    sel, cand = x[:400], x[400:]  # the new points include clusters the selected set barely covers
    got = S.continue_greedy(sel, cand, 150, seed=seed)
    ref, dref = brute_continue(sel, cand, 150)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, ref)
    chosen, d = S._continue_greedy(sel, cand, 150, 10, seed, "cpu", False)
    np.testing.assert_array_equal(chosen, ref)
    np.testing.assert_array_equal(d, dref)  # every candidate's final distance to selected ∪ chosen, exactly


def test_continue_greedy_ties_and_duplicates_follow_first_index_rule() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(900, 6)).astype(np.float32)  # many equal distances and repeated rows
    np.testing.assert_array_equal(S.continue_greedy(x[:60], x[60:], 300), brute_continue(x[:60], x[60:], 300)[0])


def test_continue_greedy_on_projected_features_and_final_distances() -> None:
    """Arbitrary float32 features: the reference runs on the union snapped to one grid (the documented space)."""
    x = clustered(1500, 200, seed=7)
    zs, zc = S.jl_projection(x[:300], 128, 7), S.jl_projection(x[300:], 128, 7)
    grid, scale = S.to_exact_grid(np.concatenate([zs, zc]))
    ref, dref = brute_continue(grid[:300], grid[300:], 120)
    chosen, d = S._continue_greedy(zs, zc, 120, 10, 7, "cpu", False)
    np.testing.assert_array_equal(chosen, ref)
    np.testing.assert_array_equal(d, dref * scale)  # exact nearest distance to selected ∪ chosen


def test_nearest_distance_kernels_agree_bit_for_bit() -> None:
    """The pruned numba kernel and the blocked torch GEMM give the same exact nearest-selected distances."""
    x = clustered(3000, 64, seed=11)
    grid, _ = S.to_exact_grid(x)
    zs, zc = grid[:700], grid[700:]
    ref = np.sqrt(S._nearest_sq_torch(torch.from_numpy(zs), torch.from_numpy(zc), block=4096).numpy())
    np.testing.assert_array_equal(S._nearest_numba(zs, zc), ref)
    brute = np.array([np.sqrt(((zs.astype(np.float64) - c) ** 2).sum(1)).min() for c in zc[:200]])
    np.testing.assert_array_equal(ref[:200], brute)


def test_continue_greedy_contracts() -> None:
    x = clustered(200, 16, seed=0)
    assert S.continue_greedy(x[:50], x[50:], 0).shape == (0,)
    with pytest.raises(DataError, match="at least one selected"):
        S.continue_greedy(x[:0], x, 5)
    with pytest.raises(DataError, match=r"\[S, d\] and \[N, d\]"):
        S.continue_greedy(x[:5, :8], x, 5)
    with pytest.raises(ValueError, match="k must be in"):
        S.continue_greedy(x[:5], x[5:10], 6)


def test_sampler_continue_select_uses_its_projection_and_ratio() -> None:
    x = clustered(2000, 256, seed=5)  # 256 > 128 dims: the JL projection matters
    bank, new = x[:1200], x[1200:]
    sampler = S.GreedyCoresetSampler(0.1, seed=5, progress=False)
    first = sampler.select(bank)
    got = sampler.continue_select(bank[first], new)
    assert len(got) == int(800 * 0.1) and len(np.unique(got)) == len(got)
    zs, zc = S.jl_projection(bank[first], 128, 5), S.jl_projection(new, 128, 5)
    np.testing.assert_array_equal(got, S.continue_greedy(zs, zc, 80))
    wrong_seed = S.continue_greedy(S.jl_projection(bank[first], 128, 6), S.jl_projection(new, 128, 6), 80)
    assert not np.array_equal(got, wrong_seed)  # the projection seed is really used
    assert sampler.coverage_radius_ == pytest.approx(sampler.min_distances_.max())
    np.testing.assert_array_equal(S.GreedyCoresetSampler(1.0).continue_select(bank[first], new), np.arange(800))
    assert len(S.GreedyCoresetSampler(0.001, progress=False).continue_select(bank[first], new[:10])) == 1


# ------------------------------------------------------------------------------------- PatchCore.extend
def textures(n: int, seed: int, freq: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    imgs = []
    for _ in range(n):
        phase = torch.rand(1, generator=g) * 6.28
        img = (0.5 + 0.25 * torch.sin(xx / freq + yy / 7.0 + phase)).expand(3, SIZE, SIZE)
        imgs.append((img + 0.03 * torch.randn(3, SIZE, SIZE, generator=g)).clamp(0, 1))
    return torch.stack(imgs)


def small_model(**kw) -> PatchCore:
    params = dict(backbone="efficientnet_lite0", resize=None, image_size=SIZE, coreset_ratio=0.25, device="cpu",
                  progress=False, batch_size=4)
    params.update(kw)
    return PatchCore(**params)


def features_of(model: PatchCore, images: torch.Tensor) -> np.ndarray:
    return np.concatenate([f for f, _ in model.iter_features(images)])  # [B, h*w, D]


@pytest.fixture(scope="module")
def images_a() -> torch.Tensor:
    return textures(4, seed=0)


@pytest.fixture(scope="module")
def images_b() -> torch.Tensor:
    return textures(3, seed=1, freq=1.5)  # another stripe frequency: patches the bank does not cover


def test_extend_greedy_appends_the_continuation(images_a, images_b) -> None:
    model = small_model().fit(images_a)
    old = model.memory_bank_.copy()
    assert model.n_train_patches_ == 4 * 64 and len(old) == 64
    new = features_of(model, images_b).reshape(-1, old.shape[1])
    assert model.extend(images_b) is model
    bank = model.memory_bank_
    assert bank.shape == (64 + int(3 * 64 * 0.25), old.shape[1]) and model.n_train_patches_ == 7 * 64
    np.testing.assert_array_equal(bank[:64], old)  # the old bank is a prefix
    expected = S.GreedyCoresetSampler(0.25, seed=0, progress=False).continue_select(old, new)
    np.testing.assert_array_equal(bank[64:], new[expected])
    # the rebuilt index answers over the whole bank: every row finds itself
    sq, ids = model.index_.search(bank, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(len(bank)))
    assert np.all(sq[:, 0] <= 1e-6)
    # extending can only lower patch scores of the new images, and lowers them at the appended patches
    before = small_model().fit(images_a).score_features(new.reshape(3, 64, -1))[1].reshape(-1)
    after = model.score_features(new.reshape(3, 64, -1))[1].reshape(-1)
    assert np.all(after <= before + 1e-5)
    assert np.all(after[expected] <= 1e-3) and before[expected].min() > 1e-2


@pytest.mark.parametrize(("method", "ratio"), [("none", 0.25), ("greedy", 1.0), ("random", 0.25)])
def test_extend_keep_all_and_random(images_a, images_b, method, ratio) -> None:
    model = small_model(coreset_method=method, coreset_ratio=ratio).fit(images_a)
    old = model.memory_bank_.copy()
    new = features_of(model, images_b)
    model.extend(features=new)  # precomputed [B, h*w, D] features take the same path
    flat = new.reshape(-1, new.shape[-1])
    np.testing.assert_array_equal(model.memory_bank_[: len(old)], old)
    if method != "random":  # none, or greedy at ratio 1: every new patch is appended, in order
        np.testing.assert_array_equal(model.memory_bank_[len(old) :], flat)
        scores, grids = model.score_features(new)  # every new patch is in the bank: distance ~0
        assert grids.max() <= 1e-3 and scores.max() <= 1e-3
    else:
        picked = np.random.default_rng(0).choice(len(flat), size=int(len(flat) * 0.25), replace=False)
        np.testing.assert_array_equal(model.memory_bank_[len(old) :], flat[np.sort(picked)])
    assert model.n_train_patches_ == 7 * 64


class _CountingIndex:
    """An injected nearest-neighbour method: records every fit."""

    def __init__(self):
        self.inner = NearestNeighbourIndex("flat")
        self.fitted = []

    def fit(self, bank):
        self.fitted.append(len(bank))
        self.inner.fit(bank)
        return self

    def search(self, queries, k=1):
        return self.inner.search(queries, k)


def test_extend_honours_injected_index_and_image_paths(tmp_path, images_a, images_b) -> None:
    from PIL import Image

    paths = []
    for i, img in enumerate(images_b):
        path = tmp_path / f"{i}.png"
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    injected = _CountingIndex()
    model = small_model(nn_index=injected, coreset_method="none").fit(images_a)
    model.extend(paths)
    assert model.index_.fitted == [64 * 7] and injected.fitted == []  # a copy, fitted once on the whole bank
    assert model.n_train_patches_ == 7 * 64 and len(model.memory_bank_) == 7 * 64


def test_extended_model_save_load_round_trip(tmp_path, images_a, images_b) -> None:
    model = small_model().fit(images_a).extend(images_b)
    model.save(tmp_path / "m")
    loaded = PatchCore.load(tmp_path / "m")
    np.testing.assert_array_equal(loaded.memory_bank_, model.memory_bank_)
    assert loaded.n_train_patches_ == model.n_train_patches_ and loaded.feature_grid_ == model.feature_grid_
    test = textures(2, seed=9, freq=2.0)
    s1, m1 = model.predict(test)
    s2, m2 = loaded.predict(test)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    # a loaded model extends like the original: same appended rows
    more = textures(2, seed=10, freq=1.0)
    np.testing.assert_array_equal(loaded.extend(more).memory_bank_, model.extend(more).memory_bank_)


def test_extend_refuses_bad_input(images_a) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        small_model().extend(images_a)
    model = small_model().fit(images_a)
    with pytest.raises(ValueError, match="either images or features"):
        model.extend()
    with pytest.raises(DataError, match="feature grid"):
        model.extend(torch.rand(1, 3, 2 * SIZE, 2 * SIZE))
    with pytest.raises(DataError, match=r"must be \[M, 224\]"):
        model.extend(features=np.zeros((5, 10), np.float32))
    with pytest.raises(DataError, match="NaN"):
        model.extend(features=np.full((5, 224), np.nan, np.float32))
    assert len(model.memory_bank_) == 64  # nothing changed by the refused calls


def test_extend_keeps_the_calibrated_thresholds():
    """A larger bank only lowers nominal scores: the thresholds set at fit stay valid (and are kept)."""
    import torch

    from patchcore_core.model import PatchCore

    rng = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 64, 64, generator=rng)
    model = PatchCore(backbone="efficientnet_lite0", image_size=64, resize=72, coreset_ratio=0.5, device="cpu",
                      progress=False, calibration_min_images=3).fit(images[:10])
    assert model.threshold_ is not None and model.calibration_["n_holdout_images"] == 3
    before = dict(model.calibration_)
    model.extend(images[10:])
    assert model.calibration_ == before and model.threshold_ == before["threshold"]
