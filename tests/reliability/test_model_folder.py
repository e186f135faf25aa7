"""A saved model folder is checked against itself when loaded: every file's sha256, the bank's shape and
values, and that the index belongs to the bank. Every failure names the file; nothing is scored."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.reliability.conftest import FAST, run_cli


def _predict(capsys, model: Path, dataset: Path, out: Path) -> tuple[int, str, str]:
    return run_cli(capsys, "predict", "--model", model, "--images", dataset / "brick" / "test" / "good",
                   "--out", out, "--quiet", "--device", "cpu")


def _rehash(model: Path, name: str) -> None:
    """Make config.json agree with a replaced file (a folder that is consistent but wrong in another way)."""
    config = json.loads((model / "config.json").read_text())
    config["files"][name]["sha256"] = hashlib.sha256((model / name).read_bytes()).hexdigest()
    (model / "config.json").write_text(json.dumps(config))


def _refused(capsys, model, dataset, tmp_path, message: str) -> None:
    out = tmp_path / "scores"
    code, stdout, stderr = _predict(capsys, model, dataset, out)
    assert code == 2 and stdout == "", stderr
    assert message in stderr and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert not out.exists()


def test_index_of_another_model_with_the_same_dimension_is_refused(capsys, model_copy, dataset, tmp_path):
    other = tmp_path / "other"
    assert run_cli(capsys, "fit", "--data", dataset, "--category", "gravel", "--out", other, *FAST)[0] == 0
    shutil.copy(other / "index.faiss", model_copy / "index.faiss")
    _refused(capsys, model_copy, dataset, tmp_path,
             f"{model_copy / 'index.faiss'} does not match config.json (sha256 differs)")
    # Even when config.json is edited to match, the index is foreign: it holds another bank of the same shape.
    assert np.load(other / "memory_bank.npy").shape == np.load(model_copy / "memory_bank.npy").shape
    _rehash(model_copy, "index.faiss")
    _refused(capsys, model_copy, dataset, tmp_path, "index.faiss does not belong to")


def test_nan_memory_bank_is_refused(capsys, model_copy, dataset, tmp_path):
    bank = np.load(model_copy / "memory_bank.npy")
    bank[3, 5] = np.nan
    np.save(model_copy / "memory_bank.npy", bank)
    _rehash(model_copy, "memory_bank.npy")
    _refused(capsys, model_copy, dataset, tmp_path, f"{model_copy / 'memory_bank.npy'} holds non-finite values")


def test_truncated_memory_bank_is_refused_by_name(capsys, model_copy, dataset, tmp_path):
    path = model_copy / "memory_bank.npy"
    path.write_bytes(path.read_bytes()[:1000])
    _refused(capsys, model_copy, dataset, tmp_path, f"{path} does not match config.json")
    _rehash(model_copy, "memory_bank.npy")
    _refused(capsys, model_copy, dataset, tmp_path, f"{path} is damaged")


def test_garbage_index_is_refused_by_name(capsys, model_copy, dataset, tmp_path):
    (model_copy / "index.faiss").write_bytes(b"not a faiss index" * 100)
    _rehash(model_copy, "index.faiss")
    _refused(capsys, model_copy, dataset, tmp_path, f"{model_copy / 'index.faiss'} is not a readable faiss index")


def test_index_of_the_wrong_dimension_is_refused(capsys, model_copy, dataset, tmp_path):
    import faiss

    index = faiss.IndexFlatL2(16)
    index.add(np.zeros((10, 16), np.float32))
    faiss.write_index(index, str(model_copy / "index.faiss"))
    _rehash(model_copy, "index.faiss")
    _refused(capsys, model_copy, dataset, tmp_path, f"{model_copy / 'index.faiss'} does not belong to")


def test_missing_file_and_wrong_format_are_refused(capsys, model_copy, dataset, tmp_path):
    (model_copy / "index.faiss").unlink()
    _refused(capsys, model_copy, dataset, tmp_path, "is incomplete: index.faiss is missing")


def test_models_saved_before_the_checksums_still_load_and_are_checked(model_copy):
    """Format-1 folders (no sha256 in config.json) load, with the shape, value and index checks."""
    from patchcore_core.errors import IncompatibleModelError
    from patchcore_core.model import PatchCore

    config = json.loads((model_copy / "config.json").read_text())
    config["format_version"] = 1
    del config["files"]
    (model_copy / "config.json").write_text(json.dumps(config))
    model = PatchCore.load(model_copy, device="cpu")
    assert model.memory_bank_.shape[0] == model.index_.ntotal_
    path = Path(model_copy / "memory_bank.npy")
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(IncompatibleModelError, match=f"{path} is damaged"):
        PatchCore.load(model_copy, device="cpu")


def test_a_non_finite_bank_is_never_saved(tmp_path):
    from patchcore_core.errors import DataError
    from patchcore_core.model import PatchCore

    bank = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    bank[0, 0] = np.inf
    model = PatchCore(device="cpu", progress=False).fit_memory_bank(bank, (4, 5), 20)
    with pytest.raises(DataError, match="memory_bank holds non-finite values"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())
