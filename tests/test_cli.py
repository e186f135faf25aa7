"""The `patchcore` CLI contract: demo-data, fit, predict, evaluate, and clear errors."""

import json

import numpy as np
import pandas as pd
import pytest

from patchcore_core.cli import main
from patchcore_core.demo_data import write_demo_dataset

FAST = ["--backbone", "efficientnet_lite0", "--resize", "80", "--image-size", "64", "--coreset-ratio", "0.25",
        "--device", "cpu", "--quiet", "--threads", "1"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return write_demo_dataset(root / "data", categories=["brick", "grass"], n_train=8, n_test_good=4,
                              n_test_defect=5, size=96)


def test_evaluate_writes_the_promised_artifacts(demo_root, tmp_path):
    assert main(["evaluate", "--data", str(demo_root), "--category", "brick", "--out", str(tmp_path), *FAST]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for key in ["image_auroc", "pixel_auroc", "au_pro", "f1_threshold", "misclassified", "error_at_full_recall",
                "fit_seconds", "predict_seconds_per_image", "peak_rss_mb"]:
        assert metrics[key] is not None, key
    table = pd.read_parquet(tmp_path / "predictions.parquet")
    assert list(table.columns) == ["image_index", "path", "relpath", "label", "defect_type", "score"]
    assert len(table) == 9 and set(table.label) == {0, 1}
    maps, masks = np.load(tmp_path / "anomaly_maps.npy"), np.load(tmp_path / "gt_masks.npy")
    assert maps.shape == masks.shape == (9, 64, 64)
    assert maps.dtype == np.float32 and masks.dtype == np.uint8
    assert masks[table.label.to_numpy() == 0].sum() == 0 and masks[table.label.to_numpy() == 1].sum() > 0
    # Anyone can recompute the metrics from the artifacts alone.
    from patchcore_core.metrics import compute_metrics

    again = compute_metrics(table.label.to_numpy(), table.score.to_numpy(), masks, maps)
    assert again["image_auroc"] == pytest.approx(metrics["image_auroc"])
    assert again["au_pro"] == pytest.approx(metrics["au_pro"])
    assert (tmp_path / "roc_pr.png").stat().st_size > 0


def test_fit_then_predict_and_evaluate_saved_model(demo_root, tmp_path, capsys):
    model_dir = tmp_path / "model"
    assert main(["fit", "--data", str(demo_root), "--category", "grass", "--out", str(model_dir), *FAST]) == 0
    assert (model_dir / "config.json").is_file()
    images = demo_root / "grass" / "test"
    assert main(["predict", "--model", str(model_dir), "--images", str(images), "--out", str(tmp_path / "p"),
                 "--quiet"]) == 0
    scores = pd.read_parquet(tmp_path / "p" / "predictions.parquet")
    assert len(scores) == 9 and scores["error"].isna().all()
    assert np.load(tmp_path / "p" / "anomaly_maps.npy").shape == (9, 64, 64)
    threshold = json.loads((model_dir / "config.json").read_text())["state"]["calibration"]["threshold"]
    assert (scores["threshold"] == threshold).all() and (scores["is_anomalous"] == (scores["score"] >= threshold)).all()
    assert scores["model_fingerprint"].nunique() == 1 and len(scores["model_fingerprint"][0]) == 16
    from PIL import Image

    for row in scores.itertuples():
        size = Image.open(row.path).size
        mask = Image.open(tmp_path / "p" / "masks" / f"{row.name}.png")
        assert mask.size == size and mask.mode == "L" and set(np.unique(np.asarray(mask))) <= {0, 255}
        assert Image.open(tmp_path / "p" / "heatmaps" / f"{row.name}.png").size == size
    assert main(["evaluate", "--data", str(demo_root), "--category", "grass", "--model", str(model_dir),
                 "--out", str(tmp_path / "e"), "--quiet"]) == 0
    evaluated = pd.read_parquet(tmp_path / "e" / "predictions.parquet")
    by_path = dict(zip(scores.path, scores.score, strict=True))
    np.testing.assert_allclose([by_path[p] for p in evaluated.path], evaluated.score, rtol=1e-6)


def test_evaluate_all_categories_writes_summary(demo_root, tmp_path, capsys):
    assert main(["evaluate", "--data", str(demo_root), "--category", "all", "--out", str(tmp_path), *FAST]) == 0
    assert (tmp_path / "brick" / "metrics.json").is_file() and (tmp_path / "grass" / "metrics.json").is_file()
    summary = (tmp_path / "summary.md").read_text()
    assert "| brick |" in summary and "**mean**" in summary


def test_errors_name_the_setting(tmp_path, capsys):
    assert main(["evaluate", "--data", str(tmp_path / "missing"), "--category", "x", "--out", str(tmp_path / "o"),
                 *FAST]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["predict", "--model", str(tmp_path), "--images", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "config.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_demo_data_command(tmp_path, capsys):
    assert main(["demo-data", "--out", str(tmp_path / "d")]) == 0
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.is_dir()) == ["brick", "grass", "gravel"]


@pytest.mark.parametrize("method", ["spade", "padim"])
def test_baseline_methods_through_the_same_cli(demo_root, tmp_path, method):
    out = tmp_path / method
    assert main(["evaluate", "--data", str(demo_root), "--category", "brick", "--out", str(out), "--method", method,
                 *FAST]) == 0
    assert json.loads((out / "metrics.json").read_text())["image_auroc"] is not None
