"""PatchCoreEnsemble: scikit-learn contract, bit-for-bit save/load, normalisation by NOMINAL statistics only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.base import clone

from patchcore_core.ensemble import PatchCoreEnsemble, nominal_statistics

SHARED = {"backbone": "efficientnet_lite0", "resize": None, "image_size": 64, "coreset_ratio": 0.5}
MEMBERS = ({"patch_size": 3}, {"patch_size": 1, "layers": ["blocks.4"], "num_neighbors": 2})


def _images(seed: int, n: int, defect: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.linspace(0, 1, 64).view(1, 1, 1, 64).expand(n, 3, 64, 64).clone()
    x = (0.6 * base + 0.1 * torch.rand(n, 3, 64, 64, generator=g)).clamp(0, 1)
    if defect:
        x[:, :, 20:36, 20:36] = torch.rand(n, 3, 16, 16, generator=g)
    return x


@pytest.fixture(scope="module")
def fitted():
    model = PatchCoreEnsemble(params=SHARED, members=MEMBERS, calibration_stride=2, device="cpu", progress=False)
    train = _images(0, 8)
    return model.fit(train), train


def test_constructor_stores_settings_and_clone_works(fitted):
    model, _ = fitted
    copy = clone(model).set_params(calibration_stride=3)
    assert copy.params == SHARED and copy.members == MEMBERS and copy.calibration_stride == 3
    assert not hasattr(copy, "members_")
    with pytest.raises(ValueError, match="share image_size"):
        PatchCoreEnsemble(params=SHARED, members=({}, {"image_size": 32})).member_settings()


def test_statistics_are_leave_one_image_out_over_train_images_only(fitted):
    model, train = fitted
    assert model.stats_.shape == (2, 4)
    for member, stats in zip(model.members_, model.stats_, strict=True):
        # recompute by hand: every 2nd train image scored against the bank rows of the OTHER train images
        feats = np.concatenate([f for f, _ in member.iter_features(train)])
        n, hw, _ = feats.shape
        bank = member.memory_bank_
        # which train image each bank row came from: match rows back to the train features
        flat = feats.reshape(-1, feats.shape[-1])
        source = np.array([np.flatnonzero((flat == row).all(1))[0] // hw for row in bank])
        img, patch = [], []
        for i in range(0, n, 2):
            # scored as the member scores: mean distance to its num_neighbors nearest allowed bank rows
            d = np.sort(np.sqrt(((feats[i][:, None, :] - bank[None, source != i, :]) ** 2).sum(-1)), axis=1)
            d = d[:, : member.num_neighbors].mean(1)
            img.append(d.max())
            patch.append(d)
        np.testing.assert_allclose(stats, nominal_statistics(np.array(img), np.concatenate(patch)), rtol=2e-4)


def test_scores_are_z_scored_with_nominal_statistics_not_test_set_min_max(fitted):
    model, _ = fitted
    test = torch.cat([_images(1, 3), _images(2, 3, defect=True)])
    scores, maps = model.predict(test)
    member_scores = [m.predict(test)[0] for m in model.members_]
    expected = np.mean([(s - st[0]) / st[1] for s, st in zip(member_scores, model.stats_, strict=True)], axis=0)
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    # An image's score does not depend on what else is scored: test-set min/max normalisation would map every
    # subset to [0, 1] and fail both checks below.
    for subset in ([0, 3], [4], [1, 2, 5]):
        sub_scores, sub_maps = model.predict(test[subset])
        # (equal up to float rounding of the backbone's batch-size-dependent convolution paths)
        np.testing.assert_allclose(sub_scores, scores[subset], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sub_maps, maps[subset], rtol=1e-5, atol=1e-5)
    assert scores[3:].min() > scores[:3].max()  # the pasted defects score higher than nominal images
    assert scores.min() < 0 < scores.max() or scores.max() > 1  # not squeezed into a test-set [0, 1] range


def test_save_load_round_trips_bit_for_bit_without_pickle(fitted, tmp_path):
    model, _ = fitted
    test = torch.cat([_images(3, 2), _images(4, 2, defect=True)])
    before = model.predict(test)
    model.save(tmp_path / "ens")
    config = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert config["model"] == "PatchCoreEnsemble" and len(config["state"]["member_dirs"]) == 2
    assert not list((tmp_path / "ens").rglob("*.pkl")) and not list((tmp_path / "ens").rglob("*.pickle"))
    loaded = PatchCoreEnsemble.load(tmp_path / "ens", device="cpu")
    np.testing.assert_array_equal(loaded.stats_, model.stats_)
    for a, b in zip(loaded.members_, model.members_, strict=True):
        np.testing.assert_array_equal(a.memory_bank_, b.memory_bank_)
    after = loaded.predict(test)
    assert np.array_equal(before[0], after[0]) and np.array_equal(before[1], after[1])
