"""MVTec-AD-layout dataset reader over local folders and fsspec URLs, with per-file error messages.

Layout of one category (MVTec AD)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/good/*.png
    <root>/<category>/test/<defect>/*.png
    <root>/<category>/ground_truth/<defect>/<stem>_mask.png

Preprocessing follows the PatchCore reference ("IM224"): RGB, shorter side resized to `resize`
(bilinear, antialiased, as `torchvision.transforms.Resize(int)` on a PIL image), centre crop to
`image_size`. Masks share the geometry with nearest resampling and are binarised `> 0`.
All geometry runs in PIL through `torchvision.transforms.v2.functional`, so results equal
`Compose([Resize(resize), CenterCrop(image_size), ToTensor()])` on the same PIL image.
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from patchcore_core.errors import ConfigError, DataError

__all__ = [
    "IMAGE_EXTENSIONS",
    "Sample",
    "CategoryListing",
    "list_categories",
    "list_category",
    "read_image_size",
    "load_image",
    "load_mask",
    "load_sample",
    "load_images",
    "load_masks",
    "iter_batches",
    "open_location",
    "check_image",
    "check_images",
    "require_images",
    "screen_images",
    "decode_bytes",
    "image_tensor",
    "max_image_pixels",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
GOOD = "good"
MIN_IMAGE_SIDE = 32  # smaller images carry no usable patch grid at any supported crop
DEFAULT_MAX_IMAGE_PIXELS = 50_000_000  # checked from the header, before any decode; PATCHCORE_MAX_IMAGE_PIXELS
# s3 defaults that make an unreachable endpoint fail in seconds instead of minutes of retries.
_S3_FAST_FAIL = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}}


@dataclass(frozen=True)
class Sample:
    """One image: `label` 0 = good, 1 = anomalous; `mask_path` is None for good images."""

    path: str
    label: int
    defect_type: str
    mask_path: str | None = None


@dataclass
class CategoryListing:
    """The train (all good) and test samples of one category, sorted by path."""

    root: str
    category: str
    train: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)


# --------------------------------------------------------------------------- filesystem helpers


def _options(url: str, storage_options: dict | None) -> dict:
    """Copy of `storage_options`, with fast-fail timeouts for s3 unless the caller set `config_kwargs`."""
    options = dict(storage_options or {})
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if protocol in ("s3", "s3a") and "config_kwargs" not in options:
        options["config_kwargs"] = _S3_FAST_FAIL
    return options


def open_location(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """The one fsspec entry point: (filesystem, stripped path) of `url`, with the s3 fast-fail defaults;
    configuration errors become DataError."""
    try:
        return fsspec.core.url_to_fs(url, **_options(url, storage_options))
    except Exception as exc:  # unknown protocol, missing driver, bad options
        raise DataError(f"cannot open dataset location {url}: {type(exc).__name__}: {exc}") from exc


def _is_local(fs: Any) -> bool:
    return "file" in _protocols(fs)


def _protocols(fs: Any) -> tuple[str, ...]:
    protocol = fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _full_path(fs: Any, path: str) -> str:
    """A path the loaders can open again: plain OS path when local, a URL otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _check_dir(fs: Any, path: str, url: str, what: str) -> None:
    """Raise DataError unless `path` is a reachable directory."""
    try:
        info = fs.info(path)
    except FileNotFoundError as exc:
        raise DataError(f"{what} {url} does not exist") from exc
    except Exception as exc:  # network, credentials, DNS, permissions
        raise DataError(f"cannot reach {what} {url}: {type(exc).__name__}: {exc}") from exc
    if info.get("type") != "directory":
        raise DataError(f"{what} {url} is not a directory")


def _fresh(fs: Any) -> None:
    """Drop cached remote listings (s3fs caches them per instance) so new files are seen."""
    if not _is_local(fs):
        fs.invalidate_cache()


def _is_dir(fs: Any, path: str) -> bool:
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _subdirs(fs: Any, path: str) -> list[str]:
    """Names of the immediate subdirectories of `path`, sorted."""
    entries = fs.ls(path, detail=True)
    names = {posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "directory"}
    return sorted(n for n in names if n and not n.startswith("."))


# --------------------------------------------------------------------------- listing


def list_categories(root: str, storage_options: dict | None = None) -> list[str]:
    """Sorted names of the subfolders of `root` that hold a `train/good` folder."""
    fs, base = open_location(str(root), storage_options)
    _fresh(fs)
    _check_dir(fs, base, str(root), "dataset root")
    return _categories(fs, base)


def _categories(fs: Any, base: str) -> list[str]:
    return [name for name in _subdirs(fs, base) if _is_dir(fs, posixpath.join(base, name, "train", GOOD))]


def list_category(root: str, category: str, storage_options: dict | None = None,
                  need_test: bool = True) -> CategoryListing:
    """List and validate one category; every layout problem raises DataError naming the folder or file.

    `need_test=False` (fitting) lists `train/good` only: no test split or masks are needed to fit.
    """
    root = str(root)
    fs, base = open_location(root, storage_options)
    _fresh(fs)
    _check_dir(fs, base, root, "dataset root")
    cat = f"{base.rstrip('/')}/{category}"
    if not _is_dir(fs, cat):
        found = _categories(fs, base)
        raise DataError(f"category {category!r} not found under {root}; categories found: {found or 'none'}")
    try:
        rel_files = [p[len(cat) + 1 :] for p in fs.find(cat) if p.startswith(cat + "/")]
    except Exception as exc:
        raise DataError(f"cannot list {_full_path(fs, cat)}: {type(exc).__name__}: {exc}") from exc
    train = _train_samples(fs, cat, rel_files)
    test = _test_samples(fs, cat, rel_files) if need_test else []
    return CategoryListing(root=root, category=category, train=train, test=test)


def _images_in(rel_files: Iterable[str], depth: int) -> list[list[str]]:
    """Split relative paths with `depth` components whose file name is an image."""
    parts = (p.split("/") for p in rel_files)
    return sorted(p for p in parts if len(p) == depth and _is_image_name(p[-1]))


def _train_samples(fs: Any, cat: str, rel_files: list[str]) -> list[Sample]:
    folder = posixpath.join(cat, "train", GOOD)
    names = [p[2] for p in _images_in(rel_files, 3) if p[0] == "train" and p[1] == GOOD]
    if not names:
        if not _is_dir(fs, folder):
            raise DataError(f"missing train/good folder: {_full_path(fs, folder)}")
        raise DataError(f"train/good folder {_full_path(fs, folder)} holds no images (extensions {IMAGE_EXTENSIONS})")
    return [Sample(_full_path(fs, posixpath.join(folder, n)), 0, GOOD, None) for n in names]


def _test_samples(fs: Any, cat: str, rel_files: list[str]) -> list[Sample]:
    folder = posixpath.join(cat, "test")
    images = [p for p in _images_in(rel_files, 3) if p[0] == "test"]
    if not images:
        if not _is_dir(fs, folder):
            raise DataError(f"missing test folder: {_full_path(fs, folder)}")
        raise DataError(f"test folder {_full_path(fs, folder)} has no subfolder holding images")
    masks = {p for p in rel_files if p.startswith("ground_truth/")}
    samples, missing = [], []
    for _, defect, name in images:
        path = _full_path(fs, posixpath.join(folder, defect, name))
        if defect == GOOD:
            samples.append(Sample(path, 0, GOOD, None))
            continue
        mask_rel = _find_mask(masks, defect, name)
        if mask_rel is None:
            expected = _full_path(fs, posixpath.join(cat, _mask_rel(defect, name)))
            missing.append(f"{path} (expected mask {expected})")
            continue
        samples.append(Sample(path, 1, defect, _full_path(fs, posixpath.join(cat, mask_rel))))
    if missing:
        shown = "; ".join(missing[:5]) + ("; ..." if len(missing) > 5 else "")
        raise DataError(f"{len(missing)} anomalous test image(s) have no ground-truth mask: {shown}")
    return samples


def _mask_rel(defect: str, name: str, ext: str = ".png") -> str:
    stem = posixpath.splitext(name)[0]
    return f"ground_truth/{defect}/{stem}_mask{ext}"


def _find_mask(masks: set[str], defect: str, name: str) -> str | None:
    """The mask of test/<defect>/<name>: `<stem>_mask.png` first, then other image extensions."""
    for ext in (".png", *IMAGE_EXTENSIONS):
        for candidate in (_mask_rel(defect, name, ext), _mask_rel(defect, name, ext.upper())):
            if candidate in masks:
                return candidate
    return None


# --------------------------------------------------------------------------- decoding


def _read_bytes(path: str, storage_options: dict | None) -> bytes:
    """Whole-file read: a plain `open` for local paths, fsspec otherwise."""
    path = str(path)
    try:
        if "://" not in path:
            with open(path, "rb") as fh:
                return fh.read()
        if path.startswith("file://"):
            with open(path[len("file://") :], "rb") as fh:
                return fh.read()
        with fsspec.open(path, "rb", **_options(path, storage_options)) as fh:
            return fh.read()
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    except Exception as exc:
        raise DataError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def max_image_pixels(raw: str | int | None = None) -> int:
    """The pixel limit of one image: `raw` when given, else $PATCHCORE_MAX_IMAGE_PIXELS, else the default;
    ConfigError for a value that is not an integer >= 32*32."""
    raw = os.environ.get("PATCHCORE_MAX_IMAGE_PIXELS") if raw is None else raw
    if raw is None:
        return DEFAULT_MAX_IMAGE_PIXELS
    text = str(raw).strip()
    if not text.isdigit() or int(text) < MIN_IMAGE_SIDE**2:
        raise ConfigError(f"setting PATCHCORE_MAX_IMAGE_PIXELS: must be an integer >= {MIN_IMAGE_SIDE**2} "
                          f"(got {str(raw)!r})")
    return int(text)


def _size_problem(size: tuple[int, int], min_side: bool = True) -> str | None:
    """Why an input image of this (width, height) is refused (too small, too many pixels), or None."""
    w, h = size
    if min_side and min(w, h) < MIN_IMAGE_SIDE:
        return f"{w}x{h} px is smaller than the minimum side of {MIN_IMAGE_SIDE} px"
    limit = max_image_pixels()
    if w * h > limit:
        return f"{w}x{h} px = {w * h / 1e6:.1f} MP exceeds the limit of {limit / 1e6:g} MP (PATCHCORE_MAX_IMAGE_PIXELS)"
    return None


def decode_bytes(data: bytes, name: str, what: str = "image", min_side: bool = False) -> Image.Image:
    """Fully decode image bytes after checking the pixel count from the header (and, with `min_side`, the
    minimum side); errors are DataError naming `name` only."""
    try:
        with warnings.catch_warnings():  # our own pixel limit applies below; Pillow's warning adds nothing
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:  # Pillow's own guard (far above ours) fired at the header
        raise DataError(f"{what} {name}: {exc}") from exc
    except Exception as exc:  # not an image at all
        raise DataError(f"corrupt or unreadable {what} {name}: {type(exc).__name__}: {exc}") from exc
    problem = _size_problem(img.size, min_side) if what == "image" else None
    if problem:
        raise DataError(f"{what} {name}: {problem}")
    try:
        img.load()  # force the full decode so truncation surfaces here, not later
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, zlib/struct errors
        raise DataError(f"corrupt or unreadable {what} {name}: {type(exc).__name__}: {exc}") from exc
    return img


def _decode(path: str, storage_options: dict | None, what: str = "image") -> Image.Image:
    """Open and fully decode `path`; corrupt, truncated or oversized files raise DataError naming the file."""
    return decode_bytes(_read_bytes(path, storage_options), path, what)


def check_image(path: str, storage_options: dict | None = None) -> str | None:
    """Why `path` cannot be used as an input image (unreadable, corrupt, too small, too many pixels), or None.

    Reads the header and verifies the file's structure without decoding the pixels, so a whole dataset can be
    checked before any heavy work. A local file's verdict is remembered for its (inode, size, mtime) and the
    pixel limit, so the entry points that each check their inputs (CLI, `fit`, `predict`) read it once.
    """
    local = str(path).removeprefix("file://")
    if storage_options is None and "://" not in local:
        try:
            st = os.stat(local)
        except OSError:
            return _check_image(str(path), None)
        return _check_local(local, st.st_ino, st.st_size, st.st_mtime_ns, max_image_pixels())
    return _check_image(str(path), storage_options)


@functools.lru_cache(maxsize=65536)
def _check_local(path: str, inode: int, size: int, mtime_ns: int, pixel_limit: int) -> str | None:
    return _check_image(path, None)


def _check_image(path: str, storage_options: dict | None) -> str | None:
    try:
        data = _read_bytes(path, storage_options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
        with img:
            problem = _size_problem(img.size)
            if problem:
                return problem
            img.verify()  # chunk structure and checksums (PNG), markers (JPEG): no pixel decode
    except DataError as exc:
        return str(exc)
    except Image.DecompressionBombError as exc:
        return str(exc)
    except Exception as exc:
        return f"corrupt or unreadable image: {type(exc).__name__}: {exc}"
    return None


def check_images(paths: Sequence[str], storage_options: dict | None = None, workers: int = 4) -> dict[str, str]:
    """{path: reason} of every unusable image among `paths` (empty when all are fine), read in threads."""
    reasons = _map(lambda p: check_image(str(p), storage_options), [str(p) for p in paths], workers)
    return {str(p): r for p, r in zip(paths, reasons, strict=True) if r is not None}


def screen_images(paths: Sequence[str], skip_bad: bool = False, storage_options: dict | None = None
                  ) -> tuple[list[str], dict[str, str]]:
    """(usable paths, {bad path: reason}); without `skip_bad`, any bad image is a DataError naming every one."""
    bad = check_images(paths, storage_options)
    if bad and not skip_bad:
        listed = "; ".join(f"{p}: {r}" for p, r in list(bad.items())[:20])
        more = f"; ... ({len(bad) - 20} more)" if len(bad) > 20 else ""
        raise DataError(f"{len(bad)} of {len(paths)} input image(s) cannot be used "
                        f"(--skip-bad goes on without them): {listed}{more}")
    return [str(p) for p in paths if str(p) not in bad], bad


def require_images(paths: Sequence[str], storage_options: dict | None = None) -> None:
    """DataError naming every unusable image, before any heavy work."""
    screen_images(paths, skip_bad=False, storage_options=storage_options)


def read_image_size(path: str, storage_options: dict | None = None) -> tuple[int, int]:
    """(width, height) of an image from its header, without decoding the pixels."""
    try:
        if "://" not in str(path) or str(path).startswith("file://"):
            local = str(path).removeprefix("file://")
            with Image.open(local) as img:
                return img.size
        with fsspec.open(str(path), "rb", **_options(str(path), storage_options)) as fh, Image.open(fh) as img:
            return img.size
    except FileNotFoundError as exc:
        raise DataError(f"file not found: {path}") from exc
    except Exception as exc:
        raise DataError(f"corrupt or unreadable image {path}: {type(exc).__name__}: {exc}") from exc


def _to_rgb(img: Image.Image, path: str) -> Image.Image:
    """Any PIL mode to 8-bit RGB, or to float "F" (in [0,1]) for high-bit-depth single-channel images.

    Alpha is dropped with a plain `convert("RGB")` (the stored colour of transparent pixels is kept),
    which is what the reference `Image.open(p).convert("RGB")` pipeline does.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_float(img)
    try:
        if mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    except Exception as exc:
        raise DataError(f"image {path} has mode {mode!r} that cannot be converted to RGB: {exc}") from exc


def _high_bit_depth_to_float(img: Image.Image) -> Image.Image:
    """16/32-bit integer images scale by 1/65535 and float images by 1/255 when above 1, into mode "F"."""
    arr = np.asarray(img, dtype=np.float32)
    if img.mode.startswith("I"):
        arr = arr / 65535.0
    elif arr.size and float(np.nanmax(arr)) > 1.0:
        arr = arr / 255.0
    return Image.fromarray(np.clip(np.nan_to_num(arr), 0.0, 1.0).astype(np.float32), mode="F")


def _geometry(img: Image.Image, resize: int | None, image_size: int | None, nearest: bool) -> Image.Image:
    """Shorter side to `resize`, then centre crop `image_size` (torchvision Resize(int)+CenterCrop)."""
    if resize is not None:
        interp = InterpolationMode.NEAREST if nearest else InterpolationMode.BILINEAR
        img = TF.resize(img, [int(resize)], interpolation=interp, antialias=True)
    if image_size is not None:
        img = TF.center_crop(img, [int(image_size), int(image_size)])
    return img


def _image_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB (uint8) or F (float in [0,1]) image to a float32 tensor [3,H,W] in [0,1]."""
    if img.mode == "F":
        arr = torch.from_numpy(np.array(img, dtype=np.float32))
        return arr.unsqueeze(0).expand(3, -1, -1).contiguous()
    arr = torch.from_numpy(np.array(img, dtype=np.uint8))
    return arr.permute(2, 0, 1).contiguous().float().div_(255.0)


def image_tensor(img: Image.Image, name: str, resize: int | None, image_size: int | None) -> torch.Tensor:
    """A decoded image to float32 [3,S,S] in [0,1]: RGB conversion, resize, centre crop (see module doc)."""
    return _image_tensor(_geometry(_to_rgb(img, name), resize, image_size, nearest=False))


def load_image(
    path: str,
    resize: int | None = 256,
    image_size: int | None = 224,
    storage_options: dict | None = None,
) -> torch.Tensor:
    """Decode one image to float32 [3,S,S] in [0,1] (RGB); `resize=None` skips the resize step."""
    return image_tensor(_decode(str(path), storage_options), str(path), resize, image_size)


def _binary_mask_image(img: Image.Image) -> Image.Image:
    """Any mask mode to an "L" image of 0/255 (nonzero in any colour channel = defect; alpha ignored)."""
    if img.mode == "P":
        img = img.convert("RGB")
    arr = np.asarray(img)
    if arr.ndim == 3:
        channels = 1 if img.mode in ("LA", "La") else min(3, arr.shape[2])
        arr = arr[..., :channels].max(axis=2)
    return Image.fromarray(((arr > 0).astype(np.uint8) * 255), mode="L")


def load_mask(
    path: str | None,
    resize: int | None = 256,
    image_size: int | None = 224,
    expected_size: tuple[int, int] | None = None,
    storage_options: dict | None = None,
    *,
    image_path: str | None = None,
) -> np.ndarray:
    """Decode a ground-truth mask to uint8 [S,S] in {0,1}; None gives zeros of the output size.

    `expected_size` is the (width, height) of the mask's image; a different mask size raises DataError
    (naming `image_path` too when given). Without resize/crop a None mask needs `expected_size`.
    """
    if path is None:
        return _zeros_mask(resize, image_size, expected_size)
    img = _decode(str(path), storage_options, what="mask")
    if expected_size is not None and tuple(img.size) != tuple(expected_size):
        of_image = f" of image {image_path}" if image_path else ""
        raise DataError(
            f"size mismatch: mask {path} is {img.size[0]}x{img.size[1]} but the image{of_image} is "
            f"{expected_size[0]}x{expected_size[1]}"
        )
    mask = _geometry(_binary_mask_image(img), resize, image_size, nearest=True)
    return (np.asarray(mask) > 0).astype(np.uint8)


def _zeros_mask(resize: int | None, image_size: int | None, expected_size: tuple[int, int] | None) -> np.ndarray:
    if image_size is not None:
        return np.zeros((int(image_size), int(image_size)), dtype=np.uint8)
    if expected_size is None:
        raise ValueError("an empty mask needs image_size or expected_size to know its shape")
    w, h = expected_size
    if resize is not None:
        short, long = int(resize), int(int(resize) * max(w, h) / min(w, h))
        w, h = (short, long) if w <= h else (long, short)
    return np.zeros((h, w), dtype=np.uint8)


def load_sample(
    sample: Sample,
    resize: int | None = 256,
    image_size: int | None = 224,
    storage_options: dict | None = None,
) -> tuple[torch.Tensor, np.ndarray]:
    """Image tensor [3,S,S] and mask uint8 [S,S] of one sample, checking that both sizes agree."""
    img = _decode(sample.path, storage_options)
    tensor = _image_tensor(_geometry(_to_rgb(img, sample.path), resize, image_size, nearest=False))
    mask = load_mask(
        sample.mask_path,
        resize,
        image_size,
        expected_size=img.size,
        storage_options=storage_options,
        image_path=sample.path,
    )
    return tensor, mask


# --------------------------------------------------------------------------- batches


def _path_of(item: Sample | str) -> str:
    return item.path if isinstance(item, Sample) else str(item)


def _stack(tensors: list[torch.Tensor], paths: Sequence[str], image_size: int | None) -> torch.Tensor:
    if not tensors:
        size = int(image_size) if image_size is not None else 0
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        ref = tensors[0].shape
        first = next(p for p, t in zip(paths, tensors, strict=True) if t.shape != ref)
        raise DataError(
            f"images differ in size after preprocessing ({sorted(shapes)}), e.g. {first}; "
            "set image_size to crop them to one size"
        )
    return torch.stack(tensors)


def _map(fn, items: Sequence, num_workers: int) -> list:
    """Ordered map, in a thread pool when `num_workers > 0` (PIL decodes with the GIL released)."""
    if num_workers <= 0 or len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=num_workers) as ex:
        return list(ex.map(fn, items))


def load_images(
    paths: Sequence[Sample | str],
    resize: int | None = 256,
    image_size: int | None = 224,
    storage_options: dict | None = None,
    num_workers: int = 0,
) -> torch.Tensor:
    """Decode a list of image paths (or Samples) to float32 [B,3,S,S] in [0,1], in order."""
    paths = [_path_of(p) for p in paths]
    tensors = _map(lambda p: load_image(p, resize, image_size, storage_options), paths, num_workers)
    return _stack(tensors, paths, image_size)


def load_masks(
    samples: Sequence[Sample],
    resize: int | None = 256,
    image_size: int | None = 224,
    storage_options: dict | None = None,
    num_workers: int = 0,
    check_size: bool = True,
) -> np.ndarray:
    """Masks of `samples` as uint8 [B,S,S] in {0,1} (zeros for good images).

    `check_size` reads each anomalous image's header to verify that its mask has the same size.
    """

    def one(s: Sample) -> np.ndarray:
        expected = read_image_size(s.path, storage_options) if check_size and s.mask_path else None
        return load_mask(s.mask_path, resize, image_size, expected, storage_options, image_path=s.path)

    masks = _map(one, list(samples), num_workers)
    if not masks:
        size = int(image_size) if image_size is not None else 0
        return np.zeros((0, size, size), dtype=np.uint8)
    return np.stack(masks)


def iter_batches(
    items: Sequence[Sample | str],
    batch_size: int = 32,
    resize: int | None = 256,
    image_size: int | None = 224,
    storage_options: dict | None = None,
    num_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, list]]:
    """Yield (images [b,3,S,S], the b items) in order; with workers the next batch decodes meanwhile.

    Streaming keeps only about two batches of pixels in memory, whatever the dataset size.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    items = list(items)
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    if num_workers <= 0:
        for batch in batches:
            yield load_images(batch, resize, image_size, storage_options), batch
        return
    with ThreadPoolExecutor(max_workers=num_workers) as pool:

        def submit(batch: list) -> list[Future]:
            return [pool.submit(load_image, _path_of(x), resize, image_size, storage_options) for x in batch]

        pending = submit(batches[0]) if batches else []
        try:
            for i, batch in enumerate(batches):
                current = pending
                pending = submit(batches[i + 1]) if i + 1 < len(batches) else []
                tensors = [f.result() for f in current]
                yield _stack(tensors, [_path_of(x) for x in batch], image_size), batch
        finally:  # an error or an early stop: drop the prefetched batch instead of decoding it
            for f in pending:
                f.cancel()
