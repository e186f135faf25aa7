"""The paper-report builder: published numbers, Markdown layout, and one tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from experiments.paper_report import (
    EXPERIMENTS,
    PAPER,
    PAPER_CATEGORIES,
    ReportConfig,
    build_markdown,
    build_tables,
    md_table,
    ratio_label,
    rebuild_report,
    run_paper_report,
)
from patchcore_core.config import DEFAULTS
from patchcore_core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

META = {"date": "today", "data": "/data", "device": "CPU test, 1 threads", "faiss": "x", "wall_seconds": 12.0}


def test_published_numbers_parsed():
    assert PAPER["image_auroc"]["PatchCore-10%"]["bottle"] == 100.0
    assert PAPER["image_auroc"]["PatchCore-25%"]["mean"] == 99.1
    assert PAPER["image_auroc"]["SPADE"] == {"mean": 85.5}
    assert PAPER["pixel_auroc"]["SPADE"]["bottle"] == 98.4
    assert PAPER["pixel_auroc"]["PaDiM"]["zipper"] == 98.5
    assert PAPER["au_pro"]["PatchCore-1%"]["transistor"] == 81.2
    assert PAPER["s4(1,2,3)"]["au_pro"]["bottle"] == 96.6
    assert PAPER["spade_pro"]["(2,)"]["bottle"] == 94.7  # the 28x28 level
    assert PAPER["misclassified"]["PatchCore-25%"]["total"] == 42


def test_config_validation():
    with pytest.raises(ValueError, match="unknown experiment"):
        ReportConfig(experiments=("main", "nope"))
    with pytest.raises(TypeError, match="unknown report setting"):
        run_paper_report("/nonexistent", ["x"], "/tmp", coreset_ratio=0.1)
    with pytest.raises(TypeError, match="unknown report setting"):
        run_paper_report("/nonexistent", ["x"], "/tmp", nope=1)
    assert ratio_label(0.25) == "PatchCore-25%" and ratio_label(0.01) == "PatchCore-1%"


def test_config_reads_detector_settings_from_one_validated_schema():
    cfg = ReportConfig()
    assert cfg.base == {"backbone": "efficientnet_lite0"}
    assert cfg.params == DEFAULTS.model_copy(update={"backbone": "efficientnet_lite0"})
    assert cfg.layer_names == ("blocks.2", "blocks.4") and cfg.levels == (2, 3)
    assert cfg.resize_for(224) == 256 and cfg.resize_for(280) == 320
    # grid settings by name, detector settings by name into `base` (legacy names too), validated there
    cfg = cfg.updated(image_size=48, resize=56, spade_k=3, padim_features=20, batch_size=4,
                      coreset_ratios=[0.5, 0.1], layer_sets=[[2, 3]])
    assert cfg.coreset_ratios == (0.5, 0.1) and cfg.layer_sets == ((2, 3),)
    assert cfg.base == {"backbone": "efficientnet_lite0", "image_size": 48, "resize": 56, "k_images": 3,
                        "n_features": 20, "batch_size": 4}
    p = cfg.params
    assert (p.image_size, p.resize, p.k_images, p.n_features, p.batch_size) == (48, 56, 3, 20, 4)
    assert cfg.resize_for(64) == 75
    assert cfg.updated(base={"seed": 3}).params.seed == 3 and cfg.updated(seed=4).base["image_size"] == 48
    with pytest.raises(ConfigError, match="patch_size"):
        ReportConfig(base={"patch_size": 4})
    with pytest.raises(ConfigError, match="unknown setting"):
        ReportConfig(base={"spade_k": 3})
    with pytest.raises(ValueError, match="set by the report grid"):
        ReportConfig(base={"coreset_ratio": 0.5})
    with pytest.raises(ValueError, match="not hierarchy levels"):
        ReportConfig(base={"backbone": "efficientnet_lite0", "layers": ["blocks.3"]})
    # the JSON layout round-trips; the older flat layout (detector settings beside the grid's) is read too
    assert ReportConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    legacy = ReportConfig.from_dict({"backbone": "resnet18", "spade_k": 7, "layers": [1, 2], "resize": None,
                                     "coreset_ratios": [0.2], "reweight_neighbors": 5, "gone": 1})
    assert legacy.params.layers == ["layer1", "layer2"] and legacy.levels == (1, 2)
    assert (legacy.params.k_images, legacy.params.resize, legacy.reweight_neighbors) == (7, None, 5)
    assert legacy.coreset_ratios == (0.2,) and legacy.resize_for(280) is None


def _row(cat, method, image, pixel=0.9, pro=0.8, experiment="main", setting="s", **extra):
    return {"category": cat, "experiment": experiment, "method": method, "setting": setting, "image_auroc": image,
            "pixel_auroc": pixel, "au_pro": pro, "misclassified": 1, "error_at_full_recall": 0.25, **extra}


def test_markdown_prints_paper_numbers_beside_ours_and_checks_acceptance(tmp_path):
    cfg = ReportConfig(coreset_ratios=(0.1,))
    rows = [_row("bottle", "SPADE", 0.95), _row("bottle", "PaDiM", 0.99), _row("bottle", "PatchCore-10%", 1.0),
            _row("cable", "SPADE", 0.90), _row("cable", "PaDiM", 0.97), _row("cable", "PatchCore-10%", 0.96)]
    meta = {**META, "categories": {"bottle": {"train": 209, "test": 83, "test_good": 20},
                                   "cable": {"train": 224, "test": 150, "test_good": 58}}}
    text, acceptance = build_markdown(rows, cfg, meta, [tmp_path / "f" / "bottle_roc_pr.png"], tmp_path)
    assert ("| categories | bottle (209 train, 83 test: 20 good, 63 defective), "
            "cable (224 train, 150 test: 58 good, 92 defective) |") in text
    assert "| bottle | 95.00 / – | 99.00 / – | 100.00 / 100 |" in text
    assert "98.4" not in text.split("## 2a")[0]  # pixel numbers stay in their own table
    assert "| bottle | 90.00 / 98.4 | 90.00 / 98.3 | 90.00 / 98.6 |" in text
    assert "| **mean** | 92.50 / – | 98.00 / – | 98.00 / – |" in text  # the paper's mean is over 15 categories
    assert acceptance == {"bottle": True, "cable": False}
    assert "cable: **no**" in text
    assert "![bottle_roc_pr](f/bottle_roc_pr.png)" in text
    tables = build_tables(rows, cfg)
    assert list(tables["image_auroc"].columns) == ["category", "SPADE", "PaDiM", "PatchCore-10%"]
    assert tables["image_auroc"]["PatchCore-10%"].tolist() == [1.0, 0.96]


def test_paper_mean_printed_only_for_all_fifteen_categories(tmp_path):
    cfg = ReportConfig(coreset_ratios=(0.1,))
    rows = [_row(c, m, 0.9) for c in PAPER_CATEGORIES for m in ("SPADE", "PaDiM", "PatchCore-10%")]
    text, acceptance = build_markdown(rows, cfg, META, [], tmp_path)
    assert "| **mean** | 90.00 / 85.5 | 90.00 / 95.3 | 90.00 / 99 |" in text
    assert "15 (paper 47)" in text and len(acceptance) == 15


def test_header_names_the_categories_run_not_bottle(tmp_path):
    rows = [_row("cable", m, 0.9) for m in ("SPADE", "PaDiM", "PatchCore-10%")]
    meta = {**META, "categories": {"cable": {"train": 224, "test": 150, "test_good": 58}}}
    text, _ = build_markdown(rows, ReportConfig(coreset_ratios=(0.1,)), meta, [], tmp_path)
    header = text.split("## 1.")[0]
    assert "| categories | cable (224 train, 150 test: 58 good, 92 defective) |" in header
    assert "bottle" not in header and "209" not in header
    assert "`experiments.paper_report.run_paper_report`" in header
    # without recorded counts (results JSON of older runs) the names alone
    text, _ = build_markdown(rows, ReportConfig(coreset_ratios=(0.1,)), META, [], tmp_path)
    assert "| categories | cable |" in text


def test_rebuild_of_the_committed_results_matches_the_committed_report():
    """bench/results/paper_report.json renders exactly the committed report (bottle and pill, issue #13)."""
    results = REPO / "bench" / "results" / "paper_report.json"
    saved = json.loads(results.read_text())
    cfg = ReportConfig.from_dict(saved["config"])
    assert cfg.params.backbone == "efficientnet_lite0" and cfg.levels == (2, 3) and cfg.params.k_images == 50
    from experiments.paper_report.grid import _figure_path

    figures = [_figure_path(p, results.parent) for p in saved["figures"]]  # also from a clone elsewhere
    text, acceptance = build_markdown(saved["rows"], cfg, saved["meta"], figures, results.parent)
    committed = (REPO / "bench" / "results" / "paper_report.md").read_text()
    assert text.rstrip("\n") == committed.rstrip("\n")
    assert acceptance == {"bottle": True, "pill": True}


def test_md_table():
    assert md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n|---|---|\n| 1 | x |"


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    pytest.importorskip("patchcore_core.sampler")
    from patchcore_core.demo_data import write_demo_dataset

    root = tmp_path_factory.mktemp("data")
    write_demo_dataset(root / "demo", categories=["brick"], n_train=8, n_test_good=3, n_test_defect=5, size=56)
    out = tmp_path_factory.mktemp("out")
    return run_paper_report(
        str(root / "demo"), ["brick"], out, image_size=48, resize=56, coreset_ratios=(0.5, 0.1), heatmap_ratio=0.1,
        ablation_ratio=0.1, lowshot_sizes=(1, 3, 100), image_sizes=(48, 64), layer_sets=((2,), (2, 3)),
        patch_sizes=(1, 3), timing_images=2, spade_k=3, device="cpu", batch_size=4,
    )


def test_tiny_run_writes_report_tables_and_figures(tiny_report, tmp_path):
    res = tiny_report
    text = res.report_path.read_text()
    assert text == res.markdown
    for heading in ("## 1. Image-level", "## 2a.", "## 2b.", "## 3. Greedy coreset vs random", "## 4. Exact vs",
                    "## 5. Inference time", "### 6.1", "### 6.2", "### 6.3", "### 6.4", "### 6.5", "### 6.6",
                    "## Figures"):
        assert heading in text, heading
    assert "PatchCore-50%" in text and "CPU" in res.device
    assert "| categories | brick (8 train, 8 test: 3 good, 5 defective) |" in text
    assert "| image size | resize 56, centre crop 48 |" in text and "K = 3 images" in text
    assert set(res.acceptance) == {"brick"}
    experiments = {r["experiment"] for r in res.rows}
    assert experiments == set(EXPERIMENTS)
    lowshot = [r for r in res.rows if r["experiment"] == "lowshot"]
    assert sorted({r["n_train"] for r in lowshot}) == [1, 3]  # 100 > 8 train images is skipped
    assert {r["method"] for r in lowshot} == {"PatchCore-10%", "SPADE", "PaDiM"}
    for r in res.rows:
        if r["experiment"] != "timing":
            assert 0.0 <= r["image_auroc"] <= 1.0
    assert [r["setting"] for r in res.rows if r["experiment"] == "image_size"] == ["48px", "64px"]
    # the ablations' default setting reuses the main run: same numbers under patch_size, layers, image_size
    default = {r["experiment"]: r["image_auroc"] for r in res.rows
               if (r["experiment"], r["setting"]) in {("patch_size", "P = 3"), ("layers", "(2,3)"),
                                                       ("image_size", "48px")}}
    assert len(set(default.values())) == 1 and len(default) == 3
    assert len(res.figure_paths) == 2
    for path in res.figure_paths:
        assert path.suffix == ".png" and 1000 < path.stat().st_size < 200_000
    written = res.write_tables(tmp_path / "tables")
    assert {p.stem for p in written} >= {"image_auroc", "pixel_auroc", "au_pro", "timing", "lowshot"}
    saved = json.loads(res.report_path.with_suffix(".json").read_text())
    assert saved["config"]["base"] == {"backbone": "efficientnet_lite0", "image_size": 48, "resize": 56,
                                       "k_images": 3, "batch_size": 4}
    assert saved["config"]["detector"]["k_images"] == 3 and saved["config"]["coreset_ratios"] == [0.5, 0.1]
    rebuilt = rebuild_report(res.report_path.with_suffix(".json"), tmp_path / "again.md")
    assert rebuilt.acceptance == res.acceptance
    assert rebuilt.markdown.split("## 1.")[0] == res.markdown.split("## 1.")[0]
    def body(text: str) -> str:
        return text.split("## 1.")[1].split("## Figures")[0]

    assert body(rebuilt.markdown) == body(res.markdown)
    assert np.isclose(res.tables["image_auroc"]["SPADE"].iloc[0],
                      [r for r in res.rows if r["method"] == "SPADE" and r["experiment"] == "main"][0]["image_auroc"])


def test_presets_section_puts_the_preset_beside_the_base(tmp_path):
    rows = [_row(c, "base (10 %)", 0.93, experiment="preset", setting="lite0", fit_seconds=10.0,
                 seconds_per_image=0.05) for c in ("bottle", "pill")]
    rows += [_row(c, "preset offline", 0.97, experiment="preset", setting="lite1", fit_seconds=100.0,
                  seconds_per_image=0.2) for c in ("bottle", "pill")]
    rows += [{"category": "pill", "experiment": "preset", "method": "preset paper", "setting": "wrn50",
              "not_run": "no ImageNet weights for 'wide_resnet50_2'"}]
    text, _ = build_markdown(rows, ReportConfig(coreset_ratios=(0.1,), presets=("offline", "paper")), META, [],
                             tmp_path)
    section = text.split("## 7.")[1]
    assert "| base (10 %) | lite0 | 93.00 | 90.00 | 80.00 | 10.0 | 0.0500 | – |" in section
    assert "| preset offline | lite1 | 97.00 | 90.00 | 80.00 | 100.0 | 0.2000 | – |" in section
    assert "not run: no ImageNet weights" in section
    with pytest.raises(ValueError, match="unknown preset"):
        ReportConfig(presets=("nope",))


def test_anomalib_bench_header_names_the_category_run_and_its_counts(tmp_path):
    import argparse
    import importlib.util
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("bench_anomalib", REPO / "bench" / "bench_anomalib.py")
    bench = importlib.util.module_from_spec(spec)
    import sys

    sys.modules.setdefault("bench_anomalib", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    for split, n in (("train/good", 3), ("test/good", 2), ("test/crack", 4)):
        (tmp_path / "pill" / split).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "pill" / split / f"{i:03d}.png").write_bytes(b"")
    assert bench.category_counts(str(tmp_path), "pill") == (3, 6)
    failed = {"error": "boom", "child": SimpleNamespace(returncode=1)}
    args = argparse.Namespace(category="pill", coreset_ratio=0.01, data=str(tmp_path))
    text = bench.report(args, failed, failed, {"started": "a", "finished": "b", "threads": 2})
    assert text.splitlines()[0].startswith("# MVTec AD pill: ours vs anomalib") and "ratio 0.01" in text
    assert "bottle" not in text and "209" not in text
