"""Fixtures of the reliability suite: small generated datasets and models, and a helper to run the CLI."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("PATCHCORE_THREADS", "1")

FAST = ["--backbone", "efficientnet_lite0", "--resize", "72", "--image-size", "64", "--coreset-ratio", "0.25",
        "--batch-size", "4", "--quiet", "--device", "cpu", "--threads", "1"]


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """A valid two-category MVTec-layout dataset (brick, gravel): 4 train, 2 good + 2 defective test, 80 px."""
    from patchcore_core.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("reliability") / "data"
    return write_demo_dataset(root, categories=["brick", "gravel"], seed=0, n_train=4, n_test_good=2,
                              n_test_defect=2, size=80)


@pytest.fixture
def data_copy(dataset, tmp_path) -> Path:
    """A private copy of the dataset that a test may damage."""
    return Path(shutil.copytree(dataset, tmp_path / "data"))


@pytest.fixture(scope="session")
def model_dir(dataset, tmp_path_factory) -> Path:
    """A PatchCore model fitted on brick by the CLI itself."""
    from patchcore_core.cli import main

    out = tmp_path_factory.mktemp("model") / "brick"
    assert main(["fit", "--data", str(dataset), "--category", "brick", "--out", str(out), *FAST]) == 0
    return out


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """`patchcore ARGV` in this process (the console script's code path): (exit code, stdout, stderr)."""
    from patchcore_core.cli import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).rglob("*")) if Path(path).exists() else []
