"""Golden scores: the detectors give the same float32 scores and anomaly maps, bit for bit, as when the golden
file was written (tests/golden/make_golden.py, run before the stage/config redesign)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).with_name("golden")


def _golden_module():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def computed():
    return _golden_module().compute()


@pytest.mark.parametrize("case", sorted(json.loads((GOLDEN_DIR / "demo_scores.json").read_text())))
def test_scores_and_maps_are_bitwise_golden(case, computed):
    expected = json.loads((GOLDEN_DIR / "demo_scores.json").read_text())[case]
    got = computed[case]
    assert got["scores_hex"] == expected["scores_hex"], f"{case}: image scores changed"
    assert got["maps_shape"] == expected["maps_shape"]
    assert got["maps_sha256"] == expected["maps_sha256"], f"{case}: anomaly maps changed"
