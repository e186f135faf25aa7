"""Stage 1, fetch: copy one category of an MVTec-layout dataset from any fsspec URL into a local cache, with a
checksum manifest.

The cache mirrors `<source>/<category>/{train,test,ground_truth}/...` image files under
`<cache_root>/<category>/`. A rerun copies only files whose size or source version (S3 ETag, local mtime)
changed, and deletes cached files the source no longer has. Every file is written under a temporary name
and renamed; the manifest (Parquet: relpath, size, sha256, source_version) is written last, so a cache
whose manifest exists is complete and verified.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from patchcore_core.artifacts import atomic_write
from patchcore_core.data import IMAGE_EXTENSIONS, list_categories, list_category, open_location, require_images
from patchcore_core.errors import DataError

__all__ = ["FetchResult", "MANIFEST_DIR", "run", "source_slug", "list_source_files", "fetch_category",
           "read_manifest", "verify_cache"]

MANIFEST_DIR = "_manifests"
LAYOUT_DIRS = ("train", "test", "ground_truth")
_CHUNK = 1 << 20


class FetchResult(BaseModel):
    """A category copied into the local cache: `root` is an MVTec-layout folder holding `category`."""

    source_url: str
    root: str
    category: str
    manifest: str
    digest: str  # sha256 over (relpath, sha256) of every file: identifies the data, whatever its source
    n_files: int
    n_bytes: int
    n_copied: int
    n_train: int
    n_test: int
    n_anomalous: int


def run(source_url: str, category: str, work_dir: str | os.PathLike, storage_options: dict | None = None,
        log: Callable[[str], None] | None = None) -> FetchResult:
    """Mirror `<source_url>/<category>` into `<work_dir>/data/<source slug>/`: the stage's entry point."""
    cache_root = Path(work_dir) / "data" / source_slug(source_url)
    return fetch_category(source_url, category, cache_root, storage_options, log=log)


def source_slug(source: str) -> str:
    """A short, filesystem-safe name for a dataset URL (distinct URLs never share a cache folder)."""
    normalised = str(source).rstrip("/")
    if "://" not in normalised:
        normalised = "file://" + os.path.abspath(normalised)
    name = posixpath.basename(normalised.split("://", 1)[1]) or "root"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:40]
    return f"{safe}-{hashlib.sha256(normalised.encode()).hexdigest()[:10]}"


def _version(info: dict[str, Any]) -> str:
    """What changes when a file's content changes: the object version id or ETag on object stores, mtime
    locally, else the size. Only a fast pre-check: reuse also needs the bytes to match the manifest sha256."""
    for key in ("VersionId", "version_id", "ETag", "etag", "md5", "mtime", "LastModified", "last_modified",
                "created"):
        if info.get(key) is not None:
            return f"{key}:{str(info[key]).strip(chr(34))}"
    return f"size:{info.get('size')}"


def check_name(name: str, what: str) -> str:
    """A category name or a relative key that stays inside its folder: no '..', '.', empty or absolute parts and
    no backslash. A source that lists such a key could make the mirror write outside the work dir."""
    parts = name.split("/")
    if "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\x00" in name:
        raise DataError(f"refusing {what} {name!r}: it must be a plain relative path (no '..', '.', absolute "
                        "path or backslash)")
    return name


def inside(root: Path, rel: str) -> Path:
    """`root / rel`, checked to resolve inside `root` (symlinks included); DataError naming `rel` otherwise."""
    dest = root / rel
    if not dest.resolve().is_relative_to(root.resolve()):
        raise DataError(f"refusing key {rel!r}: it resolves outside {root}")
    return dest


def list_source_files(source: str, category: str, storage_options: dict | None = None) -> dict[str, dict]:
    """{relpath: {"size", "version", "path"}} of the category's image files at the source (one listing call).

    Every key is checked before anything is copied: one that could escape the cache is refused, by name.
    """
    check_name(category, "category")
    fs, base = open_location(str(source), storage_options)
    cat = posixpath.join(base.rstrip("/"), category)
    try:
        fs.invalidate_cache()  # fsspec instances are shared: never trust an earlier listing's ETags
        found = fs.find(cat, detail=True)
    except FileNotFoundError:
        found = {}
    except Exception as exc:  # credentials, DNS, endpoint down
        raise DataError(f"cannot list {source}/{category}: {type(exc).__name__}: {exc}") from exc
    files: dict[str, dict] = {}
    for path, info in found.items():
        if info.get("type") == "directory" or not path.startswith(cat + "/"):
            continue
        rel = check_name(path[len(cat) + 1 :], "key")
        parts = rel.split("/")
        name = parts[-1]
        if parts[0] not in LAYOUT_DIRS or name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        files[rel] = {"size": int(info.get("size") or 0), "version": _version(info), "path": path}
    if not files:
        try:
            known = list_categories(str(source), storage_options=storage_options)
        except DataError as exc:
            raise DataError(f"category {category!r}: {exc}") from exc
        raise DataError(
            f"category {category!r} not found (or holds no images) under {source}; "
            f"categories found: {known or 'none'}"
        )
    return files


def read_manifest(path: str | os.PathLike) -> dict[str, dict]:
    """{relpath: row} of a manifest written by `fetch_category`."""
    table = pq.read_table(path)
    return {row["relpath"]: row for row in table.to_pylist()}


def _copy(fs: Any, src: str, dest: Path) -> str:
    """Stream `src` to `dest` atomically and return its sha256."""
    digest = hashlib.sha256()
    with atomic_write(dest) as tmp:
        with fs.open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(_CHUNK):
                digest.update(chunk)
                fout.write(chunk)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_category(
    source: str,
    category: str,
    cache_root: str | os.PathLike,
    storage_options: dict | None = None,
    workers: int = 8,
    log: Callable[[str], None] | None = None,
) -> FetchResult:
    """Mirror `<source>/<category>` into `<cache_root>/<category>`, validate the layout, write the manifest.

    `source` is a local path, `file://` or any fsspec URL (`s3://bucket/prefix`, with `storage_options`
    such as endpoint_url/key/secret). Raises `DataError` naming the folder or file for layout problems.
    """
    cache_root = Path(cache_root)
    dest_root = cache_root / category
    manifest_path = cache_root / MANIFEST_DIR / f"{category}.parquet"
    files = list_source_files(source, category, storage_options)
    fs, _ = open_location(str(source), storage_options)
    previous = read_manifest(manifest_path) if manifest_path.is_file() else {}

    def one(rel: str) -> tuple[str, str, bool]:
        info = files[rel]
        dest = inside(dest_root, rel)
        old = previous.get(rel)
        if (
            old is not None
            and old["source_version"] == info["version"]
            and old["size"] == info["size"]
            and dest.is_file()
            and dest.stat().st_size == info["size"]
            # Size and version are only the pre-check. The cached copy must still hash to the manifest (else it
            # was damaged: copy again); a local source is hashed too, since a file replaced with the same size
            # and mtime keeps both (reading a local file is cheap next to extracting its features). Object
            # stores change the ETag / version id with the content, so their copies are not re-read.
            and _sha256(dest) == old["sha256"]
            and ("file" not in ([fs.protocol] if isinstance(fs.protocol, str) else fs.protocol)
                 or _sha256(Path(info["path"])) == old["sha256"])
        ):
            return rel, old["sha256"], False
        return rel, _copy(fs, info["path"], dest), True

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(one, sorted(files)))
    copied = sum(1 for _, _, c in results if c)
    # Drop cached files the source no longer has, so the cache mirrors the source.
    if dest_root.is_dir():
        for path in dest_root.rglob("*"):
            if path.is_file() and path.relative_to(dest_root).as_posix() not in files:
                path.unlink()
    listing = list_category(str(cache_root), category)  # validates the layout of the local copy
    require_images([s.path for s in listing.train + listing.test])  # every bad image named before extraction
    if log:
        log(f"{category}: {len(files)} files, {copied} copied from {source}")

    rels = [rel for rel, _, _ in results]
    shas = [sha for _, sha, _ in results]
    digest = hashlib.sha256("".join(f"{r}\0{s}\n" for r, s in zip(rels, shas, strict=True)).encode()).hexdigest()
    table = pa.table(
        {
            "relpath": pa.array(rels, pa.string()),
            "split": pa.array([r.split("/", 1)[0] for r in rels], pa.string()),
            "size": pa.array([files[r]["size"] for r in rels], pa.int64()),
            "sha256": pa.array(shas, pa.string()),
            "source_version": pa.array([files[r]["version"] for r in rels], pa.string()),
        },
        metadata={b"source": str(source).encode(), b"category": category.encode(), b"digest": digest.encode()},
    )
    with atomic_write(manifest_path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return FetchResult(
        source_url=str(source),
        root=str(cache_root.resolve()),
        category=category,
        manifest=str(manifest_path.resolve()),
        digest=digest,
        n_files=len(rels),
        n_bytes=int(sum(files[r]["size"] for r in rels)),
        n_copied=copied,
        n_train=len(listing.train),
        n_test=len(listing.test),
        n_anomalous=sum(s.label for s in listing.test),
    )


def verify_cache(manifest_path: str | os.PathLike, root: str | os.PathLike, category: str) -> list[str]:
    """Relpaths whose cached bytes no longer match the manifest checksum (empty when the cache is intact)."""
    bad = []
    for rel, row in read_manifest(manifest_path).items():
        path = Path(root) / category / rel
        if not path.is_file() or _sha256(path) != row["sha256"]:
            bad.append(rel)
    return bad
