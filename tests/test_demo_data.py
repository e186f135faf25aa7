"""The embedded demo dataset: offline, deterministic, MVTec layout, exact defect masks."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchcore_core import data, demo_data
from patchcore_core.errors import DataError

SMALL = {"categories": ["brick", "grass"], "n_train": 3, "n_test_good": 2, "n_test_defect": 5, "size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("demo") / "ds", seed=0, **SMALL)


def test_same_seed_same_bytes_other_seed_differs(demo: Path, tmp_path: Path) -> None:
    again = demo_data.write_demo_dataset(tmp_path / "again", seed=0, **SMALL)
    other = demo_data.write_demo_dataset(tmp_path / "other", seed=1, **SMALL)
    assert _files(again) == _files(demo)
    other_files = _files(other)
    assert other_files.keys() == _files(demo).keys()
    images = [k for k in other_files if k.endswith(".png")]
    assert all(other_files[k] != _files(demo)[k] for k in images if "/test/" in k and "mask" not in k)


def test_category_independent_of_selection(demo: Path, tmp_path: Path) -> None:
    only_grass = demo_data.write_demo_dataset(tmp_path / "g", seed=0, **{**SMALL, "categories": ["grass"]})
    assert _files(only_grass / "grass") == _files(demo / "grass")


def test_layout_readable(demo: Path) -> None:
    assert data.list_categories(str(demo)) == ["brick", "grass"]
    listing = data.list_category(str(demo), "brick")
    assert len(listing.train) == 3
    defects = [s.defect_type for s in listing.test if s.label == 1]
    assert sorted(defects) == sorted(demo_data.DEFECT_TYPES)
    assert sum(s.label == 0 for s in listing.test) == 2
    info = json.loads((demo / "demo_dataset.json").read_text())
    assert info["seed"] == 0 and info["categories"] == ["brick", "grass"] and info["size"] == 64
    images = data.load_images(listing.test, resize=64, image_size=64)
    masks = data.load_masks(listing.test, resize=64, image_size=64)
    assert images.shape == (7, 3, 64, 64) and masks.shape == (7, 64, 64)


def test_images_and_masks(demo: Path) -> None:
    for cat in ("brick", "grass"):
        for path in (demo / cat).glob("t*/*/*.png"):
            img = Image.open(path)
            assert img.mode == "RGB" and img.size == (64, 64), path
        masks = sorted((demo / cat / "ground_truth").glob("*/*_mask.png"))
        assert len(masks) == 5
        for path in masks:
            m = np.asarray(Image.open(path))
            assert m.dtype == np.uint8 and m.shape == (64, 64)
            assert set(np.unique(m)) == {0, 255}
            assert 0.004 <= (m > 0).mean() <= 0.06, path


@pytest.mark.parametrize("kind", demo_data.DEFECT_TYPES)
def test_defect_mask_is_exactly_the_changed_region(kind: str) -> None:
    rng = np.random.default_rng(7)
    photo = demo_data._load_photo("gravel")
    for _ in range(3):
        clean = demo_data._random_crop(photo, 128, rng)
        out, mask = demo_data.add_defect(clean, kind, rng, source=photo)
        diff = np.abs(out.astype(int) - clean.astype(int)).max(axis=2)
        assert out.dtype == np.uint8 and out.shape == clean.shape and mask.shape == (128, 128)
        assert not diff[~mask].any()  # nothing changes outside the mask
        assert demo_data.AREA_RANGE[0] <= mask.mean() <= demo_data.AREA_RANGE[1]
        assert diff[mask].mean() >= demo_data.MIN_CONTRAST  # visible
        assert (diff[mask] > 0).mean() >= 0.5  # the mask is mostly changed pixels


def test_no_network_needed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    demo_data._load_photo.cache_clear()
    every = list(demo_data.DEMO_PHOTOS)
    out = demo_data.write_demo_dataset(
        tmp_path / "offline", categories=every, n_train=1, n_test_good=0, n_test_defect=1, size=32
    )
    assert sorted(data.list_categories(str(out))) == sorted(demo_data.DEMO_PHOTOS)


def test_defaults_and_atomic_replace(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    demo_data.write_demo_dataset(out, n_train=2, n_test_good=1, n_test_defect=1, size=32)
    assert not (out / "stale.txt").exists()
    assert data.list_categories(str(out)) == sorted(demo_data.DEFAULT_CATEGORIES)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no temporary folder left behind


@pytest.mark.parametrize(
    "kwargs",
    [{"categories": ["marble"]}, {"categories": []}, {"seed": -1}, {"n_train": 0}, {"size": 8}],
)
def test_bad_settings(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(DataError):
        demo_data.write_demo_dataset(tmp_path / "x", **kwargs)
    assert not (tmp_path / "x").exists()
