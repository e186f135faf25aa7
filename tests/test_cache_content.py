"""The cache is keyed on content: a local source file replaced with the same size and mtime is fetched again and
everything downstream recomputes; a damaged cached copy is copied again before reuse."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from patchcore_core.config import DetectorParams
from patchcore_core.stages import fetch

CONFIG = DetectorParams(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4)
TARGET = "test/good/000.png"


def _uncompressed(path: Path, image: Image.Image) -> None:
    """PNG without compression: its size depends only on width, height and mode, not on the pixels."""
    image.save(path, compress_level=0)


@pytest.fixture
def local_dataset(pipeline_dataset, tmp_path) -> Path:
    root = tmp_path / "local-src"
    shutil.copytree(pipeline_dataset / "brick", root / "brick")
    target = root / "brick" / TARGET
    _uncompressed(target, Image.open(target).convert("RGB"))
    return root


def _replace_same_size_same_mtime(path: Path) -> None:
    before = path.stat()
    image = np.asarray(Image.open(path).convert("RGB")).copy()
    image[10:50, 10:50] = [255, 0, 255]  # a large magenta square: a different image, an anomalous one
    _uncompressed(path, Image.fromarray(image))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def test_fetch_detects_same_size_same_mtime_replacement_and_damaged_copies(local_dataset, tmp_path):
    work = tmp_path / "work"
    first = fetch.run(str(local_dataset), "brick", work)
    assert first.n_copied == first.n_files
    again = fetch.run(str(local_dataset), "brick", work)
    assert again.n_copied == 0 and again.digest == first.digest

    _replace_same_size_same_mtime(local_dataset / "brick" / TARGET)
    replaced = fetch.run(str(local_dataset), "brick", work)
    assert replaced.n_copied == 1 and replaced.digest != first.digest
    cached = Path(replaced.root) / "brick" / TARGET
    assert cached.read_bytes() == (local_dataset / "brick" / TARGET).read_bytes()
    assert fetch.verify_cache(replaced.manifest, replaced.root, "brick") == []

    # A cached copy damaged in place (same size) is found by its checksum and copied again.
    other = Path(replaced.root) / "brick" / "train" / "good" / "000.png"
    data = bytearray(other.read_bytes())
    data[len(data) // 2] ^= 0xFF
    other.write_bytes(bytes(data))
    assert fetch.verify_cache(replaced.manifest, replaced.root, "brick") == ["train/good/000.png"]
    repaired = fetch.run(str(local_dataset), "brick", work)
    assert repaired.n_copied == 1 and repaired.digest == replaced.digest
    assert fetch.verify_cache(repaired.manifest, repaired.root, "brick") == []


@pytest.mark.usefixtures("prefect_harness")
def test_replaced_local_image_recomputes_everything_downstream(local_dataset, pipeline_env):
    from flows.patchcore import full_benchmark

    work = str(pipeline_env["work_dir"])
    [before] = full_benchmark(str(local_dataset), ["brick"], CONFIG, work, register_models=False)
    _replace_same_size_same_mtime(local_dataset / "brick" / TARGET)
    [after] = full_benchmark(str(local_dataset), ["brick"], CONFIG, work, register_models=False)

    assert after.fetched.n_copied == 1 and after.fetched.digest != before.fetched.digest
    # Every stage downstream of the replaced test image has a new folder (its fingerprint includes the data's
    # checksums); the model, trained on the unchanged train split, is rightly reused.
    assert after.model.model_dir == before.model.model_dir
    assert after.scores.predictions != before.scores.predictions
    assert after.evaluation.metrics_path != before.evaluation.metrics_path
    old = pd.read_parquet(before.scores.predictions).set_index("relpath")["score"]
    new = pd.read_parquet(after.scores.predictions).set_index("relpath")["score"]
    assert new[TARGET] > old[TARGET]  # the replaced image now holds a defect: it scores higher
