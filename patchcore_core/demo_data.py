"""A small MVTec-layout demo dataset built offline from photos bundled with scikit-image.

Nominal images are random crops (with random flips) of one texture photo per category; defective test
images carry synthetic defects (scratches, cracks, stains, holes, pasted patches) whose binary masks are
exactly the pixels the defect changed. Everything is drawn from one `numpy.random.Generator` per category,
so the same seed gives byte-identical files. The photos are read straight from the scikit-image package
folder: no download is ever attempted.
"""

from __future__ import annotations

import importlib.util
import json
import math
import zlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from patchcore_core.artifacts import atomic_dir
from patchcore_core.errors import DataError

__all__ = ["DEMO_PHOTOS", "DEFAULT_CATEGORIES", "DEFECT_TYPES", "add_defect", "write_demo_dataset"]

# Category name -> photo file shipped inside the scikit-image wheel (skimage/data/), all 512x512.
DEMO_PHOTOS = {"brick": "brick.png", "gravel": "gravel.png", "grass": "grass.png", "ihc": "ihc.png"}
DEFAULT_CATEGORIES = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "crack", "stain", "hole", "patch")
# A defect covers this fraction of the image and changes its region by at least this mean grey level.
AREA_RANGE = (0.005, 0.05)
MIN_CONTRAST = 20.0
_MAX_ATTEMPTS = 50
_STAIN_COLOURS = np.array([[120, 70, 30], [165, 60, 25], [60, 110, 40], [40, 60, 140], [200, 180, 60]])


# --------------------------------------------------------------------------- photos and crops


@lru_cache(maxsize=8)
def _load_photo(category: str) -> np.ndarray:
    """The category's photo as read-only uint8 [H,W,3], read from scikit-image's bundled data folder."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the demo dataset needs scikit-image (pip install scikit-image)")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / DEMO_PHOTOS[category]
    if not path.is_file():
        raise DataError(f"photo {path} for demo category {category!r} is not bundled with this scikit-image")
    with Image.open(path) as img:
        arr = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
    arr.setflags(write=False)
    return arr


def _random_crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A size x size random crop with random flips; smaller photos are cropped smaller and upscaled."""
    h, w = photo.shape[:2]
    c = min(size, h, w)
    y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
    crop = photo[y : y + c, x : x + c]
    if c < size:
        crop = np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BICUBIC))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    return np.ascontiguousarray(crop)


# --------------------------------------------------------------------------- defect shapes


def _draw(size: tuple[int, int], paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """Rasterise shapes (no anti-aliasing) on an "L" canvas of (h, w); returns the boolean region."""
    canvas = Image.new("L", (size[1], size[0]), 0)
    paint(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _polyline(start: np.ndarray, angle: float, n_steps: int, step: float, turn: float, rng) -> list:
    """Points of a random walk: `n_steps` steps of `step` px whose heading jitters by N(0, turn)."""
    pts, p = [tuple(start)], start.astype(float)
    for _ in range(n_steps):
        angle += rng.normal(0.0, turn)
        p = p + step * np.array([math.cos(angle), math.sin(angle)])
        pts.append((float(p[0]), float(p[1])))
    return pts


def _blend(img: np.ndarray, target: np.ndarray | float, alpha: np.ndarray | float) -> np.ndarray:
    alpha = np.asarray(alpha, dtype=np.float32)
    if alpha.ndim == 2:
        alpha = alpha[..., None]
    return img * (1.0 - alpha) + np.asarray(target, dtype=np.float32) * alpha


def _scratch(img: np.ndarray, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A thin bright or dark polyline of a few straight segments."""
    s = min(img.shape[:2])
    n_seg = int(rng.integers(2, 5))
    seg = rng.uniform(0.4, 0.8) * s / n_seg
    width = max(1, round(s * rng.uniform(0.010, 0.018)))
    pts = _polyline(rng.uniform(0.15, 0.85, 2) * s, rng.uniform(0, 2 * math.pi), n_seg, seg, 0.4, rng)
    region = _draw(img.shape[:2], lambda d: d.line(pts, fill=255, width=width, joint="curve"))
    target = rng.uniform(225, 255) if rng.random() < 0.5 else rng.uniform(0, 30)
    return _blend(img, target, 0.85), region


def _crack(img: np.ndarray, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark random-walk line, sometimes with one branch."""
    s = min(img.shape[:2])
    step = max(1.0, 0.006 * s)
    n = int(rng.uniform(0.35, 0.7) * s / step)
    width = max(1, round(s * rng.uniform(0.010, 0.016)))
    main = _polyline(rng.uniform(0.2, 0.8, 2) * s, rng.uniform(0, 2 * math.pi), n, step, 0.15, rng)
    lines = [main]
    if rng.random() < 0.5:
        origin = np.array(main[int(rng.integers(n // 4, 3 * n // 4 + 1))])
        lines.append(_polyline(origin, rng.uniform(0, 2 * math.pi), n // 3, step, 0.2, rng))
    region = _draw(img.shape[:2], lambda d: [d.line(ln, fill=255, width=width, joint="curve") for ln in lines])
    return img * rng.uniform(0.1, 0.3), region


def _stain(img: np.ndarray, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A soft-edged colour blob made of a few overlapping ellipses; changed pixels are the mask."""
    s = min(img.shape[:2])
    r = rng.uniform(0.05, 0.09) * s
    centre = rng.uniform(0.2, 0.8, 2) * s
    blobs = [(centre + rng.uniform(-0.5, 0.5, 2) * r, rng.uniform(0.5, 1.0, 2) * r) for _ in range(4)]
    canvas = Image.new("L", (img.shape[1], img.shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for (cx, cy), (rx, ry) in blobs:
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    soft = np.asarray(canvas.filter(ImageFilter.GaussianBlur(radius=max(1.0, 0.3 * r))), np.float32) / 255
    region = soft > 0.3
    alpha = np.where(region, soft, 0.0) * rng.uniform(0.6, 0.85)
    colour = _STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))] + rng.uniform(-20, 20, 3)
    return _blend(img, colour, alpha), region


def _hole(img: np.ndarray, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A dark filled, rotated ellipse that keeps a faint trace of the texture."""
    s = min(img.shape[:2])
    a, b = rng.uniform(0.04, 0.08, 2) * s
    cx, cy = rng.uniform(0.15, 0.85, 2) * s
    rot = rng.uniform(0, math.pi)
    t = np.linspace(0, 2 * math.pi, 64, endpoint=False)
    xs = cx + a * np.cos(t) * math.cos(rot) - b * np.sin(t) * math.sin(rot)
    ys = cy + a * np.cos(t) * math.sin(rot) + b * np.sin(t) * math.cos(rot)
    poly = list(zip(xs.tolist(), ys.tolist(), strict=True))
    region = _draw(img.shape[:2], lambda d: d.polygon(poly, fill=255))
    return img * 0.12 + rng.uniform(3, 20), region


def _patch(img: np.ndarray, rng: np.random.Generator, source: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A square cut from elsewhere in the photo at another scale, rotated by k*90 degrees, pasted in."""
    h, w = img.shape[:2]
    p = max(2, round(rng.uniform(0.10, 0.18) * min(h, w)))
    zoom = float(rng.choice([0.5, 2.0]))
    q = max(1, min(round(p * zoom), *source.shape[:2]))
    sy, sx = int(rng.integers(0, source.shape[0] - q + 1)), int(rng.integers(0, source.shape[1] - q + 1))
    piece = Image.fromarray(np.ascontiguousarray(source[sy : sy + q, sx : sx + q]))
    piece = np.rot90(np.asarray(piece.resize((p, p), Image.Resampling.BICUBIC)), int(rng.integers(0, 4)))
    y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
    new = img.copy()
    new[y : y + p, x : x + p] = piece
    region = np.zeros((h, w), dtype=bool)
    region[y : y + p, x : x + p] = True
    return new, region


_DEFECTS: dict[str, Callable] = {
    "scratch": _scratch,
    "crack": _crack,
    "stain": _stain,
    "hole": _hole,
    "patch": _patch,
}


def add_defect(
    image: np.ndarray, kind: str, rng: np.random.Generator, source: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one `kind` defect on uint8 [H,W,3] `image`; returns (new image, bool mask [H,W]).

    Pixels outside the mask are left untouched, so the mask is exact. Shapes are redrawn until the
    defect covers `AREA_RANGE` of the image and changes its region by `MIN_CONTRAST` grey levels on
    average (visible, not trivially huge). `source` is the photo that `patch` cuts from (default: image).
    """
    if kind not in _DEFECTS:
        raise DataError(f"unknown defect type {kind!r}; choose from {DEFECT_TYPES}")
    src = image if source is None else source
    base = image.astype(np.float32)
    out, region = image, np.zeros(image.shape[:2], dtype=bool)
    for _ in range(_MAX_ATTEMPTS):
        new, region = _DEFECTS[kind](base, rng, src)
        out = image.copy()
        out[region] = np.clip(np.rint(new[region]), 0, 255).astype(np.uint8)
        area = float(region.mean())
        contrast = float(np.abs(out[region].astype(np.float32) - base[region]).mean()) if area else 0.0
        if AREA_RANGE[0] <= area <= AREA_RANGE[1] and contrast >= MIN_CONTRAST:
            break
    return out, region


# --------------------------------------------------------------------------- dataset


def _save_png(arr: np.ndarray, path: Path) -> None:
    """PNG with fixed options and no metadata: identical pixels give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(arr)).save(path, format="PNG", compress_level=6)


def _category_rng(seed: int, category: str) -> np.random.Generator:
    """One generator per (seed, category): a category's files do not depend on which others are built."""
    return np.random.default_rng([int(seed), zlib.crc32(category.encode("utf-8"))])


def _defect_kinds(n: int) -> list[str]:
    return [DEFECT_TYPES[i % len(DEFECT_TYPES)] for i in range(n)]


def _write_category(
    out: Path, category: str, seed: int, n_train: int, n_test_good: int, n_test_defect: int, size: int
) -> None:
    rng = _category_rng(seed, category)
    photo = _load_photo(category)
    for i in range(n_train):
        _save_png(_random_crop(photo, size, rng), out / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        _save_png(_random_crop(photo, size, rng), out / "test" / "good" / f"{i:03d}.png")
    counters = dict.fromkeys(DEFECT_TYPES, 0)
    for kind in _defect_kinds(n_test_defect):
        image, mask = add_defect(_random_crop(photo, size, rng), kind, rng, source=photo)
        name = f"{counters[kind]:03d}"
        counters[kind] += 1
        _save_png(image, out / "test" / kind / f"{name}.png")
        _save_png(mask.astype(np.uint8) * 255, out / "ground_truth" / kind / f"{name}_mask.png")


def _check_args(categories: Sequence[str] | None, seed: int, counts: dict[str, int], size: int) -> list[str]:
    cats = list(DEFAULT_CATEGORIES if categories is None else categories)
    unknown = [c for c in cats if c not in DEMO_PHOTOS]
    if unknown or not cats or len(set(cats)) != len(cats):
        raise DataError(f"demo categories must be distinct names from {sorted(DEMO_PHOTOS)}, got {cats}")
    if int(seed) < 0:
        raise DataError(f"seed must be >= 0, got {seed}")
    for name, value in counts.items():
        if int(value) < (1 if name == "n_train" else 0):
            raise DataError(f"{name} must be >= {1 if name == 'n_train' else 0}, got {value}")
    if int(size) < 32:
        raise DataError(f"size must be >= 32 pixels, got {size}")
    return cats


def write_demo_dataset(
    out_dir: str | Path,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    n_train: int = 40,
    n_test_good: int = 12,
    n_test_defect: int = 12,
    size: int = 256,
) -> Path:
    """Write an MVTec-layout dataset (one folder per category) to `out_dir` and return its path.

    `out_dir` is built in a temporary folder beside it and renamed when complete, replacing any previous
    content. Defective test images are spread round-robin over `DEFECT_TYPES`. A `demo_dataset.json`
    at the root records the settings.
    """
    counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    cats = _check_args(categories, seed, counts, size)
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        for cat in cats:
            _write_category(tmp / cat, cat, int(seed), int(n_train), int(n_test_good), int(n_test_defect), size)
        info = {
            "generator": "patchcore_core.demo_data",
            "seed": int(seed),
            "size": int(size),
            "categories": cats,
            "photos": {c: f"skimage/data/{DEMO_PHOTOS[c]}" for c in cats},
            "defect_types": sorted(set(_defect_kinds(int(n_test_defect)))),
            **{k: int(v) for k, v in counts.items()},
        }
        (tmp / "demo_dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out
