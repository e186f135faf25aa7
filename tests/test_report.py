"""The paper-report builder: published numbers, Markdown layout, and one tiny end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest

from patchcore_core.report import (
    EXPERIMENTS,
    PAPER,
    ReportConfig,
    build_markdown,
    build_tables,
    md_table,
    ratio_label,
    rebuild_report,
    run_paper_report,
)

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
    assert ratio_label(0.25) == "PatchCore-25%" and ratio_label(0.01) == "PatchCore-1%"


def _row(cat, method, image, pixel=0.9, pro=0.8, experiment="main", setting="s", **extra):
    return {"category": cat, "experiment": experiment, "method": method, "setting": setting, "image_auroc": image,
            "pixel_auroc": pixel, "au_pro": pro, "misclassified": 1, "error_at_full_recall": 0.25, **extra}


def test_markdown_prints_paper_numbers_beside_ours_and_checks_acceptance(tmp_path):
    cfg = ReportConfig(coreset_ratios=(0.1,))
    rows = [_row("bottle", "SPADE", 0.95), _row("bottle", "PaDiM", 0.99), _row("bottle", "PatchCore-10%", 1.0),
            _row("cable", "SPADE", 0.90), _row("cable", "PaDiM", 0.97), _row("cable", "PatchCore-10%", 0.96)]
    text, acceptance = build_markdown(rows, cfg, META, [tmp_path / "f" / "bottle_roc_pr.png"], tmp_path)
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
    from patchcore_core.report import PAPER_CATEGORIES

    cfg = ReportConfig(coreset_ratios=(0.1,))
    rows = [_row(c, m, 0.9) for c in PAPER_CATEGORIES for m in ("SPADE", "PaDiM", "PatchCore-10%")]
    text, acceptance = build_markdown(rows, cfg, META, [], tmp_path)
    assert "| **mean** | 90.00 / 85.5 | 90.00 / 95.3 | 90.00 / 99 |" in text
    assert "15 (paper 47)" in text and len(acceptance) == 15


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
    assert "PatchCore-50%" in text and "brick" in text and "CPU" in res.device
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
    rebuilt = rebuild_report(res.report_path.with_suffix(".json"), tmp_path / "again.md")
    assert rebuilt.acceptance == res.acceptance
    def body(text: str) -> str:
        return text.split("## 1.")[1].split("## Figures")[0]

    assert body(rebuilt.markdown) == body(res.markdown)
    assert np.isclose(res.tables["image_auroc"]["SPADE"].iloc[0],
                      [r for r in res.rows if r["method"] == "SPADE" and r["experiment"] == "main"][0]["image_auroc"])
