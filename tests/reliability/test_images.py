"""Every input image is listed and its header read before any work: unusable files fail at once, all named,
or are skipped with `--skip-bad` and reported in the outputs. Fit needs only train/good."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.reliability.conftest import FAST, files_under, run_cli


def _tiny(path: Path, size=(1, 1)) -> Path:
    Image.new("RGB", size, (128, 128, 128)).save(path)
    return path


def _huge_png(path: Path, side: int = 13000) -> Path:
    """A 13000 x 13000 PNG of about half a megabyte: 169 MP once decoded."""
    Image.new("1", (side, side), 0).save(path, optimize=True)
    return path


def _truncated(path: Path, source: Path) -> Path:
    path.write_bytes(source.read_bytes()[:300])
    return path


def test_fit_names_every_bad_train_image_before_any_work(capsys, data_copy, tmp_path):
    good = data_copy / "brick" / "train" / "good"
    first = sorted(good.iterdir())[0]
    bad = [_tiny(good / "tiny.png"), _truncated(good / "cut.png", first), good / "text.png"]
    bad[2].write_text("not an image")
    out = tmp_path / "model"
    start = time.perf_counter()
    code, stdout, stderr = run_cli(capsys, "fit", "--data", data_copy, "--category", "brick", "--out", out, *FAST)
    assert code == 2 and stdout == "" and stderr.count("\n") == 1
    assert "3 of 7 input image(s) cannot be used" in stderr
    for path in bad:
        assert str(path) in stderr
    assert "1x1 px is smaller than the minimum side of 32 px" in stderr
    assert not out.exists()
    assert time.perf_counter() - start < 20  # refused from the headers, not after extraction


def test_skip_bad_fits_on_the_rest_and_lists_what_it_skipped(capsys, data_copy, tmp_path):
    good = data_copy / "brick" / "train" / "good"
    tiny = _tiny(good / "tiny.png")
    out = tmp_path / "model"
    code, stdout, _ = run_cli(capsys, "fit", "--data", data_copy, "--category", "brick", "--out", out, *FAST,
                              "--skip-bad")
    assert code == 0 and "1 bad images skipped" in stdout
    skipped = json.loads((out / "skipped_inputs.json").read_text())
    assert list(skipped) == [str(tiny)] and "minimum side" in skipped[str(tiny)]
    assert json.loads((out / "config.json").read_text())["state"]["n_train_patches"] == 4 * 64


def test_a_huge_image_is_refused_from_its_header_without_decoding(capsys, model_dir, tmp_path):
    import resource

    images = tmp_path / "images"
    images.mkdir()
    huge = _huge_png(images / "huge.png")
    assert huge.stat().st_size < 2_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    code, _, stderr = run_cli(capsys, "predict", "--model", model_dir, "--images", images, "--out", tmp_path / "o")
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert code == 2 and f"{huge}: 13000x13000 px = 169.0 MP exceeds the limit of 50 MP" in stderr
    assert grown_mb < 100, f"peak memory grew by {grown_mb:.0f} MB: the image was decoded"
    assert not (tmp_path / "o").exists()


def test_a_one_pixel_image_is_not_scored_as_normal(capsys, model_dir, dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _tiny(images / "dot.png")
    for src in sorted((dataset / "brick" / "test" / "good").iterdir()):
        (images / src.name).write_bytes(src.read_bytes())
    code, _, stderr = run_cli(capsys, "predict", "--model", model_dir, "--images", images, "--out", tmp_path / "o")
    assert code == 2 and "dot.png: 1x1 px is smaller than the minimum side of 32 px" in stderr
    code, stdout, _ = run_cli(capsys, "predict", "--model", model_dir, "--images", images, "--out", tmp_path / "o",
                              "--skip-bad")
    assert code == 0
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert len(rows) == 2 and all("dot.png" not in r["path"] for r in rows)
    assert "dot.png" in next(iter(json.loads((tmp_path / "o" / "skipped_inputs.json").read_text())))


def test_predict_output_is_json_whatever_the_file_name(capsys, model_dir, dataset, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    src = sorted((dataset / "brick" / "test" / "good").iterdir())[0]
    odd = images / "tab\there \"quoted\".png"
    odd.write_bytes(src.read_bytes())
    code, stdout, _ = run_cli(capsys, "predict", "--model", model_dir, "--images", images, "--out", tmp_path / "o")
    assert code == 0
    [row] = [json.loads(line) for line in stdout.splitlines()]
    assert row["path"] == str(odd) and np.isfinite(row["score"])
    table = pd.read_parquet(tmp_path / "o" / "predictions.parquet")
    assert table["path"].tolist() == [str(odd)]


def test_fit_needs_only_train_good(capsys, data_copy, tmp_path):
    import shutil

    shutil.rmtree(data_copy / "brick" / "test")
    shutil.rmtree(data_copy / "brick" / "ground_truth")
    out = tmp_path / "model"
    code, _, stderr = run_cli(capsys, "fit", "--data", data_copy, "--category", "brick", "--out", out, *FAST)
    assert code == 0 and (out / "index.faiss").is_file(), stderr
    code, _, stderr = run_cli(capsys, "evaluate", "--data", data_copy, "--category", "brick", "--out",
                              tmp_path / "ev", "--model", out)
    assert code == 2 and f"missing test folder: {data_copy / 'brick' / 'test'}" in stderr
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_evaluate_names_a_missing_mask(capsys, data_copy, tmp_path):
    mask = sorted((data_copy / "brick" / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    code, _, stderr = run_cli(capsys, "evaluate", "--data", data_copy, "--category", "brick", "--out",
                              tmp_path / "ev", *FAST)
    assert code == 2 and "have no ground-truth mask" in stderr and str(mask) in stderr
    assert files_under(tmp_path / "ev") == []


def test_a_bad_test_image_is_found_before_the_fit(data_copy):
    from patchcore_core.data import list_category
    from patchcore_core.errors import DataError
    from patchcore_core.evaluation import evaluate_model
    from patchcore_core.model import PatchCore

    fits = []

    class Recording(PatchCore):
        def fit(self, images):
            fits.append(len(images))
            return super().fit(images)

    bad = sorted((data_copy / "brick" / "test" / "good").iterdir())[0]
    bad.write_bytes(bad.read_bytes()[:200])
    listing = list_category(str(data_copy), "brick")
    with pytest.raises(DataError, match=str(bad)):
        evaluate_model(Recording(backbone="efficientnet_lite0", image_size=64, resize=72), listing, fit=True)
    assert fits == []


def test_category_all_goes_on_past_a_failed_category(capsys, data_copy, tmp_path):
    broken = sorted((data_copy / "gravel" / "train" / "good").iterdir())[0]
    broken.write_text("garbage")
    out = tmp_path / "all"
    code, stdout, stderr = run_cli(capsys, "evaluate", "--data", data_copy, "--category", "all", "--out", out,
                                   *FAST)
    assert code == 1
    assert "category gravel failed" in stderr and str(broken) in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert [r["category"] for r in summary["categories"]] == ["brick"] and list(summary["failed"]) == ["gravel"]
    assert (out / "brick" / "metrics.json").is_file() and not (out / "gravel" / "metrics.json").exists()
    assert "Failed categories:" in (out / "summary.md").read_text()


def test_skip_bad_evaluation_is_marked_incomplete(capsys, data_copy, tmp_path):
    bad = sorted((data_copy / "brick" / "test" / "good").iterdir())[0]
    _tiny(bad)
    out = tmp_path / "ev"
    code, _, _ = run_cli(capsys, "evaluate", "--data", data_copy, "--category", "brick", "--out", out, *FAST,
                         "--skip-bad")
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["incomplete"] is True and list(metrics["skipped"]) == [str(bad)]
    assert metrics["n_test"] == 3 and "(incomplete)" in (out / "summary.md").read_text()


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16"])
def test_grayscale_rgba_and_16_bit_are_converted_deterministically(tmp_path, mode):
    """Documented conversions (README): gray → 3 equal channels, RGBA → RGB (alpha dropped), 16-bit → /65535."""
    from patchcore_core.data import load_image

    rng = np.random.default_rng(0)
    if mode == "I;16":
        arr = rng.integers(0, 65536, (40, 40), dtype=np.uint16)
        Image.fromarray(arr).save(tmp_path / "x.png")
        expected = np.repeat((arr / 65535.0).astype(np.float32)[None], 3, 0)
    elif mode == "L":
        arr = rng.integers(0, 256, (40, 40), dtype=np.uint8)
        Image.fromarray(arr, "L").save(tmp_path / "x.png")
        expected = np.repeat(arr[None] / 255.0, 3, 0)
    else:
        arr = rng.integers(0, 256, (40, 40, 4), dtype=np.uint8)
        Image.fromarray(arr, "RGBA").save(tmp_path / "x.png")
        expected = arr[..., :3].transpose(2, 0, 1) / 255.0
    got = load_image(str(tmp_path / "x.png"), resize=None, image_size=None).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(got, load_image(str(tmp_path / "x.png"), resize=None, image_size=None).numpy())
