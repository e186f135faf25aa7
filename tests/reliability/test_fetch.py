"""The fetch stage stays inside its destination: a source key with '..', an absolute part or a backslash is
refused by name before anything is copied, and no manifest marks the cache complete."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import fsspec
import pytest
from PIL import Image

from patchcore_core.errors import DataError
from patchcore_core.stages import fetch


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _memory_source(extra_key: str | None) -> str:
    """An in-memory fsspec source (any fsspec backend may list such keys) with one valid category 'cat'."""
    fs = fsspec.filesystem("memory")
    root = f"/src-{uuid.uuid4().hex[:8]}"
    for name in ("a.png", "b.png"):
        fs.pipe(f"{root}/cat/train/good/{name}", _png())
    fs.pipe(f"{root}/cat/test/good/c.png", _png())
    if extra_key:
        fs.pipe(f"{root}/cat/{extra_key}", _png())
    return f"memory://{root}"


@pytest.mark.parametrize("key", [
    "train/good/../../../../../escape.png",
    "train/../../outside.png",
    "train/good/..\\..\\..\\evil.png",
    "train/good/./dot.png",
])
def test_keys_that_could_escape_are_refused_by_name(tmp_path, key):
    work = tmp_path / "work"
    source = _memory_source(key)
    with pytest.raises(DataError, match="refusing key") as err:
        fetch.run(source, "cat", work)
    assert repr(key) in str(err.value)  # named exactly (repr: control characters stay visible)
    assert not list(tmp_path.rglob("*.png")), "a file was copied although the listing holds a bad key"
    assert not list(tmp_path.rglob("_manifests/*")), "a manifest marks an incomplete fetch complete"
    assert not any(p.name in {"escape.png", "outside.png", "evil.png"} for p in Path("/tmp").glob("*.png"))


@pytest.mark.parametrize("category", ["../cat", "cat/../../x", "/etc", "a\\b"])
def test_category_names_that_could_escape_are_refused(tmp_path, category):
    with pytest.raises(DataError, match="refusing category"):
        fetch.run(_memory_source(None), category, tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_a_clean_memory_source_is_fetched(tmp_path):
    result = fetch.run(_memory_source(None), "cat", tmp_path / "work")
    assert result.n_files == 3 and result.n_train == 2 and Path(result.manifest).is_file()


def test_inside_refuses_a_symlink_that_leaves_the_cache(tmp_path):
    root = tmp_path / "cache" / "cat"
    (root / "train").mkdir(parents=True)
    (root / "train" / "good").symlink_to(tmp_path)  # a link planted in the cache
    with pytest.raises(DataError, match="resolves outside"):
        fetch.inside(root, "train/good/x.png")
