"""MVTec-layout listing, image/mask decoding and the DataError messages of `patchcore_core.data`."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from patchcore_core import data
from patchcore_core.data import Sample
from patchcore_core.errors import DataError

MVTEC_ROOT = Path("/work/shared/data/mvtec_ad")


def _rgb(path: Path, w: int = 40, h: int = 30, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, w: int = 40, h: int = 30) -> Path:
    arr = np.zeros((h, w), dtype=np.uint8)
    arr[h // 4 : h // 2, w // 4 : w // 2] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_category(root: Path, name: str = "widget") -> Path:
    """train/good: 3 images, test/good: 2, test/crack: 2, test/scratch: 1, with masks; plus noise files."""
    cat = root / name
    for i in (2, 0, 1):
        _rgb(cat / "train" / "good" / f"{i:03d}.png", seed=i)
    (cat / "train" / "good" / "notes.txt").write_text("not an image")
    (cat / "train" / "good" / ".hidden.png").write_bytes(b"junk")
    for i in range(2):
        _rgb(cat / "test" / "good" / f"{i:03d}.PNG", seed=10 + i)
    for defect, n in (("crack", 2), ("scratch", 1)):
        for i in range(n):
            _rgb(cat / "test" / defect / f"{i:03d}.png", seed=20 + i)
            _mask(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return cat


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    make_category(tmp_path, "widget")
    make_category(tmp_path, "gadget")
    (tmp_path / "not_a_category" / "test").mkdir(parents=True)
    (tmp_path / "README.txt").write_text("hello")
    return tmp_path


# --------------------------------------------------------------------------- listing


def test_list_categories(tree: Path) -> None:
    assert data.list_categories(str(tree)) == ["gadget", "widget"]
    assert data.list_categories(tree.as_uri()) == ["gadget", "widget"]


def test_list_category_order_labels_masks(tree: Path) -> None:
    listing = data.list_category(str(tree), "widget")
    cat = tree / "widget"
    assert listing.category == "widget" and listing.root == str(tree)
    assert [Path(s.path) for s in listing.train] == [cat / "train" / "good" / f"{i:03d}.png" for i in range(3)]
    assert all(s.label == 0 and s.defect_type == "good" and s.mask_path is None for s in listing.train)
    got = [(Path(s.path).relative_to(cat).as_posix(), s.label, s.defect_type) for s in listing.test]
    assert got == [
        ("test/crack/000.png", 1, "crack"),
        ("test/crack/001.png", 1, "crack"),
        ("test/good/000.PNG", 0, "good"),
        ("test/good/001.PNG", 0, "good"),
        ("test/scratch/000.png", 1, "scratch"),
    ]
    for s in listing.test:
        if s.label:
            assert Path(s.mask_path) == cat / "ground_truth" / s.defect_type / (Path(s.path).stem + "_mask.png")
        else:
            assert s.mask_path is None
    assert listing == data.list_category(str(tree), "widget")  # deterministic


def test_list_category_file_url(tree: Path) -> None:
    by_path = data.list_category(str(tree), "widget")
    by_url = data.list_category(tree.as_uri(), "widget")
    assert [s.path for s in by_url.train + by_url.test] == [s.path for s in by_path.train + by_path.test]
    image, mask = data.load_sample(by_url.test[0], resize=32, image_size=28)
    assert image.shape == (3, 28, 28) and mask.shape == (28, 28) and mask.any()
    url_image = data.load_image("file://" + by_url.test[0].path, resize=32, image_size=28)
    assert torch.equal(url_image, image)


# --------------------------------------------------------------------------- layout errors


def test_nonexistent_root(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_dataset"
    with pytest.raises(DataError, match="no_such_dataset"):
        data.list_category(str(missing), "widget")
    with pytest.raises(DataError, match="no_such_dataset"):
        data.list_categories(missing.as_uri())


def test_unknown_protocol(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nosuchproto://bucket"):
        data.list_category("nosuchproto://bucket/data", "widget")


def test_category_not_found_lists_found(tree: Path) -> None:
    with pytest.raises(DataError, match="'cable' not found") as err:
        data.list_category(str(tree), "cable")
    assert "gadget" in str(err.value) and "widget" in str(err.value)


def test_empty_train_good(tree: Path) -> None:
    for f in (tree / "widget" / "train" / "good").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/good folder .*widget/train/good holds no images"):
        data.list_category(str(tree), "widget")


def test_missing_train_good(tree: Path) -> None:
    import shutil

    shutil.rmtree(tree / "widget" / "train")
    with pytest.raises(DataError, match=r"missing train/good folder: .*widget/train/good"):
        data.list_category(str(tree), "widget")


def test_missing_test_folder(tree: Path) -> None:
    import shutil

    shutil.rmtree(tree / "widget" / "test")
    with pytest.raises(DataError, match=r"missing test folder: .*widget/test"):
        data.list_category(str(tree), "widget")


def test_missing_mask(tree: Path) -> None:
    (tree / "widget" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DataError) as err:
        data.list_category(str(tree), "widget")
    msg = str(err.value)
    assert "test/crack/001.png" in msg and "ground_truth/crack/001_mask.png" in msg


# --------------------------------------------------------------------------- file errors


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "random_bytes.png"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="random_bytes.png"):
        data.load_image(str(bad))
    with pytest.raises(DataError, match="random_bytes.png"):
        data.load_mask(str(bad), 32, 28)


def test_truncated_png(tmp_path: Path) -> None:
    full = _rgb(tmp_path / "full.png", 64, 64).read_bytes()
    cut = tmp_path / "half_file.png"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(DataError, match="half_file.png") as err:
        data.load_image(str(cut))
    assert "truncated" in str(err.value) or "broken" in str(err.value)
    with pytest.raises(DataError, match="half_file.png"):
        data.load_images([str(_rgb(tmp_path / "ok.png")), str(cut)], 32, 28, num_workers=2)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="gone.png"):
        data.load_image(str(tmp_path / "gone.png"))


def test_mask_size_mismatch(tmp_path: Path) -> None:
    image = _rgb(tmp_path / "test" / "crack" / "000.png", 40, 30)
    mask = _mask(tmp_path / "ground_truth" / "crack" / "000_mask.png", 20, 30)
    sample = Sample(str(image), 1, "crack", str(mask))
    with pytest.raises(DataError, match="size mismatch") as err:
        data.load_sample(sample, 32, 28)
    assert "000_mask.png" in str(err.value) and "test/crack/000.png" in str(err.value)
    assert "20x30" in str(err.value) and "40x30" in str(err.value)
    with pytest.raises(DataError, match="000_mask.png"):
        data.load_masks([sample], 32, 28)
    with pytest.raises(DataError, match="000_mask.png"):
        data.load_mask(str(mask), 32, 28, expected_size=(40, 30))


# --------------------------------------------------------------------------- decoding


def _assert_image(t: torch.Tensor, size: int) -> None:
    assert t.shape == (3, size, size) and t.dtype == torch.float32
    assert float(t.min()) >= 0.0 and float(t.max()) <= 1.0


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "1"])
def test_modes_load_as_rgb(tmp_path: Path, mode: str) -> None:
    rgb = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 60, 3), dtype=np.uint8))
    img = rgb.convert(mode)
    path = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    t = data.load_image(str(path), resize=40, image_size=32)
    _assert_image(t, 32)
    if mode in ("L", "LA", "1"):
        assert torch.equal(t[0], t[1]) and torch.equal(t[1], t[2])


def test_rgba_drops_alpha_keeping_colour(tmp_path: Path) -> None:
    arr = np.zeros((8, 8, 4), dtype=np.uint8)
    arr[..., 0] = 200
    arr[..., 3] = 0  # fully transparent, colour kept by the plain RGB conversion
    Image.fromarray(arr, "RGBA").save(tmp_path / "rgba.png")
    t = data.load_image(str(tmp_path / "rgba.png"), resize=None, image_size=None)
    assert t.shape == (3, 8, 8) and torch.allclose(t[0], torch.full((8, 8), 200 / 255))


def test_palette_with_transparency(tmp_path: Path) -> None:
    img = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").convert("P")
    img.info["transparency"] = 0
    img.save(tmp_path / "pal.png", transparency=0)
    _assert_image(data.load_image(str(tmp_path / "pal.png"), resize=None, image_size=8), 8)


def test_16bit_grayscale_uses_full_range(tmp_path: Path) -> None:
    arr = np.full((20, 20), 32768, dtype=np.uint16)
    arr[:, :10] = 65535
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    t = data.load_image(str(tmp_path / "deep.png"), resize=None, image_size=None)
    assert t.shape == (3, 20, 20)
    assert torch.allclose(t[:, :, :10], torch.ones(3, 20, 10))
    assert torch.allclose(t[:, :, 10:], torch.full((3, 20, 10), 32768 / 65535))
    _assert_image(data.load_image(str(tmp_path / "deep.png"), resize=24, image_size=16), 16)


@pytest.mark.parametrize(("w", "h"), [(300, 200), (97, 131)])
def test_geometry_matches_torchvision(tmp_path: Path, w: int, h: int) -> None:
    path = _rgb(tmp_path / "x.jpg", w, h, seed=3)
    ref = T.Compose([T.Resize(64), T.CenterCrop(56), T.ToTensor()])(Image.open(path).convert("RGB"))
    out = data.load_image(str(path), resize=64, image_size=56)
    assert out.shape == ref.shape == (3, 56, 56)
    assert torch.allclose(out, ref, atol=1e-6)


def test_no_resize_keeps_pixels(tmp_path: Path) -> None:
    path = _rgb(tmp_path / "x.png", 40, 30)
    out = data.load_image(str(path), resize=None, image_size=None)
    expected = torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1).float() / 255
    assert torch.equal(out, expected)


def test_mask_nearest_binary_and_thin_lines_survive(tmp_path: Path) -> None:
    arr = np.zeros((50, 50), dtype=np.uint8)
    arr[:, 25] = 255  # one-pixel-wide vertical line
    arr[10:20, 5:15] = 255
    Image.fromarray(arr).save(tmp_path / "m_mask.png")
    up = data.load_mask(str(tmp_path / "m_mask.png"), resize=200, image_size=180)
    assert up.dtype == np.uint8 and up.shape == (180, 180)
    assert set(np.unique(up)) == {0, 1}
    assert up.any(axis=1).all()  # the line crosses every row after upscaling
    nearest = T.Compose([T.Resize(200, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(180)])
    ref = np.asarray(nearest(Image.open(tmp_path / "m_mask.png")))
    assert np.array_equal(up, (ref > 0).astype(np.uint8))
    down = data.load_mask(str(tmp_path / "m_mask.png"), resize=30, image_size=28)
    assert set(np.unique(down)) <= {0, 1}


def test_mask_modes_and_none(tmp_path: Path) -> None:
    rgb = np.zeros((10, 10, 3), dtype=np.uint8)
    rgb[2:4, 2:4, 2] = 1  # tiny blue value still counts as defect
    Image.fromarray(rgb).save(tmp_path / "rgb_mask.png")
    m = data.load_mask(str(tmp_path / "rgb_mask.png"), None, None)
    assert m.sum() == 4
    Image.fromarray(rgb[..., 2] > 0).save(tmp_path / "bool_mask.png")  # mode "1"
    assert np.array_equal(data.load_mask(str(tmp_path / "bool_mask.png"), None, None), m)
    assert np.array_equal(data.load_mask(None, 32, 28), np.zeros((28, 28), np.uint8))
    assert data.load_mask(None, 20, None, expected_size=(40, 30)).shape == (20, 26)


# --------------------------------------------------------------------------- batches


def test_load_images_and_iter_batches(tree: Path) -> None:
    listing = data.list_category(str(tree), "widget")
    samples = listing.train + listing.test
    seq = data.load_images(samples, 32, 28)
    threaded = data.load_images([s.path for s in samples], 32, 28, num_workers=3)
    assert seq.shape == (8, 3, 28, 28) and torch.equal(seq, threaded)
    for workers in (0, 2):
        batches = list(data.iter_batches(samples, 3, 32, 28, num_workers=workers))
        assert [len(b) for _, b in batches] == [3, 3, 2]
        assert [s for _, b in batches for s in b] == samples
        assert torch.equal(torch.cat([x for x, _ in batches]), seq)
    masks = data.load_masks(listing.test, 32, 28, num_workers=2)
    assert masks.shape == (5, 28, 28) and masks.dtype == np.uint8
    assert [bool(m.any()) for m in masks] == [s.label == 1 for s in listing.test]
    assert data.load_images([], 32, 28).shape == (0, 3, 28, 28)


def test_load_images_different_sizes_without_crop(tmp_path: Path) -> None:
    a, b = _rgb(tmp_path / "a.png", 40, 30), _rgb(tmp_path / "b.png", 30, 30)
    with pytest.raises(DataError, match="b.png"):
        data.load_images([str(a), str(b)], resize=None, image_size=None)


def test_read_image_size(tmp_path: Path) -> None:
    assert data.read_image_size(str(_rgb(tmp_path / "a.png", 41, 23))) == (41, 23)
    (tmp_path / "bad.png").write_bytes(io.BytesIO(b"nope").getvalue())
    with pytest.raises(DataError, match="bad.png"):
        data.read_image_size(str(tmp_path / "bad.png"))


# --------------------------------------------------------------------------- real data


@pytest.mark.skipif(not (MVTEC_ROOT / "bottle").is_dir(), reason="MVTec AD bottle not present")
def test_real_mvtec_bottle_listing() -> None:
    assert "bottle" in data.list_categories(str(MVTEC_ROOT))
    listing = data.list_category(str(MVTEC_ROOT), "bottle")
    assert len(listing.train) == 209
    counts: dict[str, int] = {}
    for s in listing.test:
        counts[s.defect_type] = counts.get(s.defect_type, 0) + 1
    assert counts == {"broken_large": 20, "broken_small": 22, "contamination": 21, "good": 20}
    anomalous = [s for s in listing.test if s.label == 1]
    assert len(anomalous) == 63 and all(Path(s.mask_path).is_file() for s in anomalous)
    image, mask = data.load_sample(anomalous[0])
    _assert_image(image, 224)
    assert mask.shape == (224, 224) and mask.any()
