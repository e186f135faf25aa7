"""Real MVTec AD bottle with the offline backbone: the accuracy the product promises (slow: `make test-slow`)."""

import json
import os
from pathlib import Path

import pytest

from patchcore_core.cli import main

ROOT = Path(os.environ.get("PATCHCORE_MVTEC_ROOT", Path(__file__).resolve().parents[2] / "shared/data/mvtec_ad"))


@pytest.mark.slow
@pytest.mark.skipif(not (ROOT / "bottle" / "train" / "good").is_dir(), reason=f"MVTec bottle not found under {ROOT}")
def test_bottle_efficientnet_lite0(tmp_path):
    rc = main(["evaluate", "--data", str(ROOT), "--category", "bottle", "--out", str(tmp_path),
               "--backbone", "efficientnet_lite0", "--quiet"])
    assert rc == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["image_auroc"] >= 0.98
    assert metrics["pixel_auroc"] >= 0.95
    assert metrics["n_train"] == 209 and metrics["n_test"] == 83
