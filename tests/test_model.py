"""PatchCore estimator: fit/predict shapes, an obvious defect scores higher, save/load round trip, options."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from patchcore_core import PatchCore
from patchcore_core.errors import IncompatibleModelError

SIZE = 64


def textures(n: int, seed: int, defect: bool = False) -> torch.Tensor:
    """Striped textures with noise in [0,1]; `defect` paints a dark square that no nominal image has."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    imgs = []
    for _ in range(n):
        phase = torch.rand(1, generator=g) * 6.28
        stripes = 0.5 + 0.25 * torch.sin(xx / 3.0 + yy / 7.0 + phase)
        img = stripes.expand(3, SIZE, SIZE) + 0.03 * torch.randn(3, SIZE, SIZE, generator=g)
        if defect:
            img = img.clone()
            img[:, 24:36, 28:40] = 0.02
        imgs.append(img.clamp(0, 1))
    return torch.stack(imgs)


def small_model(**kw) -> PatchCore:
    params = dict(backbone="efficientnet_lite0", resize=None, image_size=SIZE, coreset_ratio=0.25,
                  device="cpu", progress=False, batch_size=4)
    params.update(kw)
    return PatchCore(**params)


@pytest.fixture(scope="module")
def fitted():
    return small_model().fit(textures(6, seed=0))


def test_fit_state_and_predict_shapes(fitted):
    assert fitted.feature_grid_ == (8, 8)
    assert fitted.n_train_patches_ == 6 * 64
    assert fitted.memory_bank_.shape == (int(6 * 64 * 0.25), 224)
    scores, maps = fitted.predict(textures(3, seed=1))
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert maps.shape == (3, SIZE, SIZE) and maps.dtype == np.float32


def test_defect_scores_higher_and_is_localised(fitted):
    good_scores, _ = fitted.predict(textures(4, seed=2))
    bad_scores, bad_maps = fitted.predict(textures(4, seed=3, defect=True))
    assert bad_scores.min() > good_scores.max()
    inside = bad_maps[:, 24:36, 28:40].mean()
    outside = bad_maps[:, :, :16].mean()
    assert inside > 2 * outside


def test_save_load_round_trip_identical_scores(fitted, tmp_path):
    fitted.save(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "index.faiss", "memory_bank.npy"]
    loaded = PatchCore.load(tmp_path / "model")
    test = textures(3, seed=4, defect=True)
    s1, m1 = fitted.predict(test)
    s2, m2 = loaded.predict(test)
    np.testing.assert_array_equal(s1, s2)
    np.testing.assert_array_equal(m1, m2)
    assert loaded.get_params() == fitted.get_params()


def test_load_rejects_incompatible_or_incomplete(fitted, tmp_path):
    fitted.save(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["format_version"] = 999
    config["library_version"] = "9.0.0"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleModelError, match=r"format 999.*9\.0\.0.*Refit"):
        PatchCore.load(tmp_path / "m")
    with pytest.raises(IncompatibleModelError, match="config.json is missing"):
        PatchCore.load(tmp_path)


def test_save_is_atomic_on_failure(fitted, tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(fitted.index_, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        fitted.save(tmp_path / "model")
    assert list(tmp_path.iterdir()) == []


def test_predict_before_fit_fails_clearly():
    with pytest.raises(RuntimeError, match="not fitted"):
        small_model().predict(textures(1, seed=0))


@pytest.mark.parametrize(
    "options",
    [
        dict(reweight_neighbors=3),
        dict(index="ivfpq", coreset_method="none"),
        dict(coreset_method="random", distance="squared_l2", num_neighbors=3),
        dict(patch_size=1, layers=["blocks.4"], pretrain_dim=112, target_dim=112),
    ],
)
def test_options_still_separate_defects(options):
    model = small_model(**options).fit(textures(6, seed=0))
    good, _ = model.predict(textures(3, seed=5))
    bad, _ = model.predict(textures(3, seed=6, defect=True))
    assert bad.min() > good.max()


def test_reweighting_scales_scores_down(fitted):
    reweighted = small_model(reweight_neighbors=3)
    reweighted.fit(textures(6, seed=0))
    test = textures(3, seed=7, defect=True)
    plain, _ = fitted.predict(test)
    weighted, _ = reweighted.predict(test)
    assert np.all(weighted < plain) and np.all(weighted > 0)


def test_torch_and_faiss_threads_do_not_deadlock():
    """torch and faiss each bring OpenMP; with explicit thread counts a fit+predict in one process completes."""
    code = textwrap.dedent(
        f"""
        import sys; sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        from test_model import small_model, textures
        m = small_model(num_threads=2, coreset_ratio=0.5).fit(textures(4, seed=0))
        s, _ = m.predict(textures(2, seed=1))
        print("ok", len(s))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "ok 2" in out.stdout


# ------------------------------------------------------------------------------------ estimator contract


def test_scikit_learn_contract_clone_get_set_params():
    from sklearn.base import clone

    from patchcore_core.baselines import SPADE, PaDiM

    for model in (PatchCore(backbone="efficientnet_lite0", coreset_ratio=0.2), SPADE(k_images=7), PaDiM()):
        assert set(model.get_params(deep=True)) == set(type(model)._get_param_names())
        twin = clone(model)
        assert twin is not model and twin.get_params(deep=False) == model.get_params(deep=False)
        assert twin.set_params(seed=5) is twin and twin.seed == 5 and model.seed == 0
    with pytest.raises(ValueError, match="Invalid parameter"):
        PatchCore().set_params(no_such_setting=1)


def test_settings_are_validated_in_fit_not_in_the_constructor():
    from patchcore_core.errors import ConfigError

    model = PatchCore(backbone="efficientnet_lite0", coreset_ratio=1.5)  # storing a bad value is allowed
    assert model.coreset_ratio == 1.5
    with pytest.raises(ConfigError, match=r"setting coreset_ratio: .*less than or equal to 1 \(got 1.5\)"):
        model.fit(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="setting patch_size: must be odd"):
        PatchCore(patch_size=4).fit_features(np.zeros((4, 8), np.float32), (2, 2))


def test_estimator_defaults_come_from_the_one_schema():
    """Every constructor argument that is a setting has the schema's default (no second copy to drift)."""
    import inspect

    from patchcore_core.baselines import SPADE, PaDiM
    from patchcore_core.config import DEFAULTS, DetectorParams

    for cls in (PatchCore, SPADE, PaDiM):
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in DetectorParams.model_fields:
                assert param.default == getattr(DEFAULTS, name), f"{cls.__name__}.{name}"
    baseline_only = {"method", "k_images", "n_features"}
    missing = set(DetectorParams.model_fields) - baseline_only - set(PatchCore._get_param_names())
    assert not missing, f"PatchCore lacks schema settings {missing}"


class _EveryOther:
    """A user-supplied sampler: keeps every other patch (any object with `select` works)."""

    def select(self, features):
        return np.arange(0, len(features), 2)


class _RecordingIndex:
    """A user-supplied nearest-neighbour method wrapping the faiss one; records how it is used."""

    def __init__(self):
        from patchcore_core.index import NearestNeighbourIndex

        self.inner = NearestNeighbourIndex("flat")
        self.fitted_rows = None

    def fit(self, bank):
        self.fitted_rows = len(bank)
        self.inner.fit(bank)
        return self

    def search(self, queries, k=1):
        return self.inner.search(queries, k)


def test_sampler_and_index_are_injectable():
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((40, 8)).astype(np.float32)
    injected = _RecordingIndex()
    model = PatchCore(sampler=_EveryOther(), nn_index=injected, device="cpu", progress=False)
    model.fit_features(bank, (4, 10))
    np.testing.assert_array_equal(model.memory_bank_, bank[::2])
    assert model.index_.fitted_rows == 20 and injected.fitted_rows is None  # the argument itself is untouched
    scores, grids = model.score_features(bank[None, :40])
    assert grids.shape == (1, 4, 10) and np.allclose(grids.reshape(-1)[::2], 0.0)
