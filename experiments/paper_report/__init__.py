"""The paper-style report: PatchCore vs SPADE vs PaDiM on MVTec-layout categories, with the paper's ablations.

`run_paper_report(data, categories, out_dir, **settings) -> ReportResult` runs the grid of the PatchCore paper's
tables and writes one Markdown report with the published numbers beside ours, plus figures; `rebuild_report`
re-renders a saved run. Modules, each importing only those listed before it (no cycle, nothing sideways):

- `published`: the papers' published numbers (`PAPER`, `PAPER_CATEGORIES`);
- `common`: `ReportConfig` (the grid's settings + `base` detector settings), `ReportResult`, `EXPERIMENTS`,
  labels, number formatting, `md_table`, device / timing helpers;
- `markdown`: `build_tables`, `build_markdown` (uses `published`, `common`);
- `figures`: ROC / PR curves and heatmap overlays (uses nothing above but `patchcore_core`);
- `grid`: the experiment runner, `run_paper_report`, `rebuild_report` (uses `common`, `markdown`, `figures`).
"""

from experiments.paper_report.common import (
    EXPERIMENTS,
    ReportConfig,
    ReportResult,
    device_name,
    levels_key,
    md_table,
    ratio_label,
)
from experiments.paper_report.figures import plot_heatmap_grid, plot_roc_pr_methods
from experiments.paper_report.grid import rebuild_report, run_paper_report
from experiments.paper_report.markdown import build_markdown, build_tables
from experiments.paper_report.published import PAPER, PAPER_CATEGORIES

__all__ = [
    "EXPERIMENTS", "PAPER", "PAPER_CATEGORIES", "ReportConfig", "ReportResult", "build_markdown", "build_tables",
    "device_name", "levels_key", "md_table", "plot_heatmap_grid", "plot_roc_pr_methods", "ratio_label",
    "rebuild_report", "run_paper_report",
]
