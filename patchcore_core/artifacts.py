"""Everything about files on disk, in one place: atomic writes, stage folders, fingerprints, completion markers,
and the names of the files a saved model and a score stage consist of.

A stage writes into `StageDir(base, category, stage, fingerprint)`; its outputs are written atomically and the
completion marker `_SUCCESS.json` (the stage's JSON result) last. A stage is finished only while its marker
has the expected fingerprint *and* every output it lists still exists, so deleting an output makes the next
run recompute the stage, with no flag and no second cache to clear.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from patchcore_core import __version__

__all__ = [
    "STAGE_FORMAT_VERSION", "MODEL_FORMAT_VERSION", "READABLE_MODEL_FORMATS", "SUCCESS_FILE", "CONFIG_FILE",
    "BANK_FILE", "INDEX_FILE", "MODEL_FILES", "PREDICTIONS_FILE", "MAPS_FILE", "MASKS_FILE", "METRICS_FILE",
    "atomic_write", "atomic_dir", "fingerprint", "file_digest", "read_marker", "write_marker", "StageDir",
]

# Bump when a stage's output layout or meaning changes: it enters every fingerprint.
STAGE_FORMAT_VERSION = 2
# Bump when the saved model layout or the meaning of a saved field changes; loading checks it.
# 2: config.json records the sha256 of every file of the folder, and loading verifies them.
MODEL_FORMAT_VERSION = 2
READABLE_MODEL_FORMATS = (1, 2)

SUCCESS_FILE = "_SUCCESS.json"
CONFIG_FILE, BANK_FILE, INDEX_FILE = "config.json", "memory_bank.npy", "index.faiss"
MODEL_FILES = (CONFIG_FILE, BANK_FILE, INDEX_FILE)  # a saved PatchCore model folder
PREDICTIONS_FILE, MAPS_FILE, MASKS_FILE = "predictions.parquet", "anomaly_maps.npy", "gt_masks.npy"
METRICS_FILE = "metrics.json"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; it replaces `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp_path
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp_path, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            shutil.rmtree(tmp_path, ignore_errors=True)


def fingerprint(*parts: Any, length: int = 16) -> str:
    """Short sha256 of canonical JSON of `parts` plus the library and stage-format versions."""
    blob = json.dumps([__version__, STAGE_FORMAT_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:length]


def file_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the bytes of the given files, in order (e.g. a model folder: a different model never matches)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def read_marker(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The completion marker of a folder, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(directory) / SUCCESS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_marker(directory: str | os.PathLike, info: dict[str, Any]) -> Path:
    """Write a folder's completion marker (JSON) atomically: the last file a stage writes."""
    path = Path(directory) / SUCCESS_FILE
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return path


class StageDir:
    """The output folder of one stage run and its completion marker; `StageDir.of(...)` is the usual layout."""

    def __init__(self, path: str | os.PathLike, fp: str) -> None:
        self.path = Path(path)
        self.fingerprint = fp

    @classmethod
    def of(cls, base: str | os.PathLike, category: str, stage: str, fp: str) -> StageDir:
        """`<base>/<category>/<stage>-<fingerprint>/`: one folder per distinct input, so runs never collide."""
        return cls(Path(base) / category / f"{stage}-{fp}", fp)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def finished(self) -> dict[str, Any] | None:
        """The stored result when the marker matches this fingerprint and all its outputs exist, else None."""
        marker = read_marker(self.path)
        if marker is None or marker.get("fingerprint") != self.fingerprint:
            return None
        if not all(Path(p).exists() for p in marker.get("outputs", [])):
            return None
        return marker["result"]

    def finish(self, result: dict[str, Any], outputs: Iterable[str | os.PathLike]) -> None:
        """Mark the stage complete: its JSON result and the outputs whose presence the marker vouches for."""
        write_marker(self.path, {"fingerprint": self.fingerprint, "result": result,
                                 "outputs": [str(p) for p in outputs]})
