"""SPADE and PaDiM on small generated images with the offline EfficientNet-Lite0 backbone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from patchcore_core.artifacts import MODEL_FORMAT_VERSION
from patchcore_core.backbones import hierarchy_layers
from patchcore_core.baselines import (
    SPADE,
    PaDiM,
    detector_class,
    detector_params,
    load_detector,
    make_detector,
)
from patchcore_core.baselines._common import min_sq_distances
from patchcore_core.errors import IncompatibleModelError

S = 64  # image size: grids 16/8/4 at blocks.1/2/4, 2x2 at blocks.6
DEFECT = (slice(20, 36), slice(24, 40))
COMMON = dict(backbone="efficientnet_lite0", resize=None, image_size=S, device="cpu", progress=False, batch_size=5)


def _images(n: int, seed: int, defect: bool = False) -> torch.Tensor:
    """Smooth gradients with a little noise; a defect is a saturated red square."""
    gen = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, S)
    x = (0.5 * ramp[None, None, :, None] + 0.3 * ramp[None, None, None, :]).repeat(n, 3, 1, 1)
    x = x + 0.03 * torch.rand(n, 3, S, S, generator=gen)
    if defect:
        x[:, :, DEFECT[0], DEFECT[1]] = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None]
    return x.clamp(0, 1)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    return {"train": _images(12, 0), "good": _images(3, 1), "bad": _images(3, 2, defect=True)}


@pytest.fixture(scope="module")
def spade(data) -> SPADE:
    return SPADE(k_images=4, **COMMON).fit(data["train"])


@pytest.fixture(scope="module")
def padim(data) -> PaDiM:
    return PaDiM(**COMMON).fit(data["train"])


def _test_set(data) -> torch.Tensor:
    return torch.cat([data["good"], data["bad"]])


# ------------------------------------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", ["spade", "padim"])
def test_shapes_dtypes_and_defect_scores_higher(name, request, data):
    model = request.getfixturevalue(name)
    scores, maps = model.predict(_test_set(data))
    assert scores.shape == (6,) and scores.dtype == np.float32
    assert maps.shape == (6, S, S) and maps.dtype == np.float32
    assert np.isfinite(scores).all() and np.isfinite(maps).all()
    assert scores[3:].min() > scores[:3].max()  # every defective image above every nominal one
    inside = maps[3:, DEFECT[0], DEFECT[1]].mean()
    assert inside > 2 * maps[3:, :12, :12].mean()  # the defect lights up its own region
    assert inside > 2 * maps[:3].mean()
    assert model.resize is None and model.image_size == S


@pytest.mark.parametrize("cls", [SPADE, PaDiM])
def test_deterministic_refit(cls, data):
    kwargs = dict(k_images=4) if cls is SPADE else {}
    a = cls(**COMMON, **kwargs).fit(data["train"]).predict(_test_set(data))
    b = cls(**COMMON, **kwargs).fit(data["train"]).predict(_test_set(data))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("name", ["spade", "padim"])
def test_save_load_round_trip_without_pickle(name, request, data, tmp_path):
    model = request.getfixturevalue(name)
    model.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"] == model.MODEL_NAME
    assert config["format_version"] == MODEL_FORMAT_VERSION and set(config["files"]) and "library_version" in config
    assert config["params"]["backbone"] == "efficientnet_lite0" and config["params"]["image_size"] == S
    for npy in (tmp_path / "m").glob("*.npy"):
        np.load(npy, allow_pickle=False)  # plain arrays only
    loaded = load_detector(tmp_path / "m", device="cpu")
    assert type(loaded) is type(model)
    expected = model.predict(_test_set(data))
    got = loaded.predict(_test_set(data))
    np.testing.assert_array_equal(expected[0], got[0])
    np.testing.assert_array_equal(expected[1], got[1])
    mapped = type(model).load(tmp_path / "m", mmap=True).predict(_test_set(data))
    np.testing.assert_allclose(mapped[1], expected[1], rtol=1e-6)


def test_load_rejects_other_models_and_versions(spade, tmp_path):
    spade.save(tmp_path / "s")
    with pytest.raises(IncompatibleModelError, match="holds a 'SPADE' model"):
        PaDiM.load(tmp_path / "s")
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    config["format_version"] = 99
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match="format 99"):
        SPADE.load(tmp_path / "s")
    with pytest.raises(IncompatibleModelError, match="config.json is missing"):
        load_detector(tmp_path / "nothing")
    config["format_version"], config["model"] = 1, "Mystery"
    (tmp_path / "s" / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match="unknown model type"):
        load_detector(tmp_path / "s")


def test_unfitted_models_refuse_to_predict(data):
    for cls in (SPADE, PaDiM):
        with pytest.raises(RuntimeError, match="not fitted"):
            cls(**COMMON).predict(data["good"])


def test_make_detector_factory():
    assert isinstance(make_detector("SPADE", backbone="resnet18"), SPADE)
    padim = make_detector("padim", n_features=10, image_size=96)
    assert isinstance(padim, PaDiM) and padim.n_features == 10 and padim.image_size == 96
    with pytest.raises(TypeError, match="coreset_ratio"):
        make_detector("padim", coreset_ratio=0.1)
    assert isinstance(make_detector("spade", strict=False, coreset_ratio=0.1, k_images=3), SPADE)
    with pytest.raises(ValueError, match="unknown method"):
        make_detector("knn")
    assert "k_images" in detector_params("spade") and "epsilon" in detector_params("padim")


def test_make_detector_patchcore():
    pytest.importorskip("patchcore_core.sampler")
    from patchcore_core.model import PatchCore

    model = make_detector("patchcore", coreset_ratio=0.25, strict=False, k_images=5)
    assert isinstance(model, PatchCore) and model.coreset_ratio == 0.25
    assert detector_class("PatchCore") is PatchCore


def test_hierarchy_layers():
    assert hierarchy_layers("wide_resnet50_2") == {1: "layer1", 2: "layer2", 3: "layer3", 4: "layer4"}
    assert hierarchy_layers("efficientnet_lite0") == {1: "blocks.1", 2: "blocks.2", 3: "blocks.4", 4: "blocks.6"}


# ------------------------------------------------------------------------------------------------------ SPADE


def test_min_sq_distances_matches_cdist():
    gen = torch.Generator().manual_seed(0)
    q, g = torch.randn(50, 7, generator=gen), torch.randn(333, 7, generator=gen)
    expected = torch.cdist(q.double(), g.double()).min(dim=1).values ** 2
    got = min_sq_distances(q, g, max_elements=1000)  # many chunks
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-4)


def test_spade_scores_follow_the_definition(spade, data):
    """Image score = mean L2 to the K nearest pooled train features; pixel kNN over those images only."""
    test = _test_set(data)
    maps = spade.layer_maps(test)
    pooled = maps["blocks.6"].mean(dim=(2, 3)).double()
    train_pooled = torch.from_numpy(spade.train_embeddings_).double()
    dists = torch.cdist(pooled, train_pooled)
    nearest = dists.topk(4, largest=False)
    scores, _ = spade.score_features(maps)
    np.testing.assert_allclose(scores, nearest.values.mean(1).numpy(), rtol=1e-4)
    # Pixel level at blocks.2 for image 4: min distance to all blocks.2 features of its 4 nearest images.
    gal = torch.from_numpy(spade.gallery_["blocks.2"][nearest.indices[4].numpy()]).double()
    gal = gal.permute(0, 2, 3, 1).reshape(-1, gal.shape[1])
    query = maps["blocks.2"][4].double().permute(1, 2, 0).reshape(-1, gal.shape[1])
    expected = torch.cdist(query, gal).min(1).values
    single = SPADE(k_images=4, layers=["blocks.2"], sigma=0, **COMMON).fit(data["train"])
    _, single_maps = single.score_features(maps)
    up = torch.nn.functional.interpolate(expected.reshape(1, 1, 8, 8).float(), size=(S, S), mode="bilinear")
    np.testing.assert_allclose(single_maps[4], up[0, 0].numpy(), rtol=1e-3, atol=1e-3)


def test_spade_defaults_and_k_capped(data):
    model = SPADE(backbone="efficientnet_lite0")
    assert model.resolved_layers() == (["blocks.1", "blocks.2", "blocks.4"], "blocks.6")
    assert SPADE(backbone="wide_resnet50_2").resolved_layers() == (["layer1", "layer2", "layer3"], "layer4")
    small = SPADE(k_images=50, **COMMON).fit(data["train"][:3])  # K > n_train: all three are the gallery
    scores, maps = small.predict(data["bad"][:1])
    assert scores.shape == (1,) and maps.shape == (1, S, S)
    with pytest.raises(ValueError, match="k_images"):
        SPADE(k_images=0, **COMMON).fit(data["train"][:2])


# ------------------------------------------------------------------------------------------------------ PaDiM


def _maps(channels: dict[str, int]) -> dict[str, torch.Tensor]:
    return {layer: torch.zeros(1, c, 2, 2) for layer, c in channels.items()}


def test_padim_channel_subset_defaults_and_seed():
    assert PaDiM(backbone="resnet18").resolved_n_features(448) == 100
    assert PaDiM(backbone="wide_resnet50_2").resolved_n_features(1792) == 550
    lite = PaDiM(backbone="efficientnet_lite0")
    assert lite.resolved_layers() == ["blocks.1", "blocks.2", "blocks.4"]
    assert lite.resolved_n_features(176) == 100
    resnet18 = _maps({"layer1": 64, "layer2": 128, "layer3": 256})  # the channel count comes from the maps
    a = PaDiM(backbone="resnet18", seed=0)._choose_channels(resnet18)
    b = PaDiM(backbone="resnet18", seed=1)._choose_channels(resnet18)
    assert len(np.unique(a)) == 100 and a.max() < 448 and (np.diff(a) > 0).all() and not np.array_equal(a, b)
    with pytest.raises(ValueError, match="n_features"):
        PaDiM(backbone="resnet18", n_features=1000).resolved_n_features(448)


def test_padim_streamed_covariance_matches_numpy(padim, data):
    """Batches of 5 merged in chunks of positions = np.cov over all train embeddings + ε·I, inverted."""
    emb, _ = padim.embed(padim.layer_maps(data["train"]))
    emb = emb.double().numpy()  # [N, P, d]
    for p in (0, 37, emb.shape[1] - 1):
        cov = np.cov(emb[:, p].T) + padim.epsilon * np.eye(emb.shape[2])
        np.testing.assert_allclose(padim.mean_[p], emb[:, p].mean(0), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(padim.inv_covariance_[p], np.linalg.inv(cov), rtol=2e-3, atol=2e-3)


def test_padim_mahalanobis_matches_scipy(padim, data):
    from scipy.spatial.distance import mahalanobis

    emb, _ = padim.embed(padim.layer_maps(data["bad"][:2]))
    dist = padim.mahalanobis(emb).numpy()
    for b, p in ((0, 0), (1, 100), (1, 255)):
        expected = mahalanobis(emb[b, p].double().numpy(), padim.mean_[p], padim.inv_covariance_[p].astype(np.float64))
        assert dist[b, p] == pytest.approx(expected, rel=1e-3)


def test_padim_single_train_image_and_grid_mismatch(data):
    model = PaDiM(n_features=20, **COMMON).fit(data["train"][:1])  # covariance = ε·I only
    scores, _ = model.predict(data["bad"][:1])
    assert np.isfinite(scores).all()
    with pytest.raises(ValueError, match="feature grid"):
        model.score_features(model.layer_maps(_images(1, 3)[:, :, :32, :32]))


def test_fit_features_reuses_layer_maps(padim, spade, data):
    """Fitting from precomputed layer maps (how the report reuses features) equals fitting from images."""
    ext = spade.layer_maps  # blocks.1/2/4/6: a superset of PaDiM's layers
    batches = [ext(data["train"][i : i + 4]) for i in range(0, 12, 4)]
    reused = PaDiM(**COMMON).fit_features(batches)
    np.testing.assert_allclose(reused.inv_covariance_, padim.inv_covariance_, rtol=1e-4, atol=1e-4)
    maps = ext(_test_set(data))
    np.testing.assert_allclose(reused.score_features(maps)[0], padim.predict(_test_set(data))[0], rtol=1e-4)
    spade2 = SPADE(k_images=4, **COMMON).fit_features(batches)
    np.testing.assert_allclose(spade2.score_features(maps)[1], spade.predict(_test_set(data))[1], rtol=1e-5)
