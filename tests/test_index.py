"""faiss indices: exact Flat equals brute force, IVFPQ is close, chunked search and save/load are lossless."""

import numpy as np
import pytest

from patchcore_core.index import NearestNeighbourIndex


@pytest.fixture(scope="module")
def bank_and_queries():
    rng = np.random.default_rng(0)
    return rng.normal(size=(3000, 32)).astype(np.float32), rng.normal(size=(500, 32)).astype(np.float32)


def brute_force(bank, queries, k):
    d = ((queries[:, None, :].astype(np.float64) - bank[None].astype(np.float64)) ** 2).sum(-1)
    ids = np.argsort(d, axis=1)[:, :k]
    return np.take_along_axis(d, ids, 1), ids


def test_flat_is_exact_and_chunking_changes_nothing(bank_and_queries):
    bank, queries = bank_and_queries
    exp_d, exp_i = brute_force(bank, queries, 3)
    for chunk in (7, 16384):
        d, i = NearestNeighbourIndex("flat", chunk_size=chunk).fit(bank).search(queries, 3)
        np.testing.assert_array_equal(i, exp_i)
        np.testing.assert_allclose(d, exp_d, rtol=1e-4, atol=1e-3)


def test_ivfpq_recall_and_save_load(bank_and_queries, tmp_path):
    bank, queries = bank_and_queries
    index = NearestNeighbourIndex("ivfpq", nprobe=64).fit(bank)
    _, ids = index.search(queries, 1)
    _, exact = brute_force(bank, queries, 1)
    # Product quantisation of 32-d Gaussian data is lossy; recall@1 far above chance (1/3000) is what matters.
    assert (ids[:, 0] == exact[:, 0]).mean() > 0.3
    index.save(tmp_path / "ivfpq.faiss")
    loaded = NearestNeighbourIndex.load(tmp_path / "ivfpq.faiss")
    assert loaded.kind == "ivfpq"
    np.testing.assert_array_equal(loaded.search(queries, 1)[1], ids)


def test_small_bank_and_k_larger_than_bank():
    bank = np.eye(4, dtype=np.float32)
    d, i = NearestNeighbourIndex("flat").fit(bank).search(bank, 10)
    assert d.shape == (4, 4) and (i[:, 0] == np.arange(4)).all()
    with pytest.raises(ValueError, match="index must be"):
        NearestNeighbourIndex("hnsw")
    with pytest.raises(ValueError, match="non-empty"):
        NearestNeighbourIndex().fit(np.zeros((0, 4), np.float32))
