"""Stage 6, metrics: image/pixel AUROC, AU-PRO, F1 threshold and the rest of `patchcore_core.metrics`, with the
ROC/PR and PRO figures and heatmap overlays of the worst and best cases. metrics.json is written last."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from patchcore_core.artifacts import CONFIG_FILE, METRICS_FILE, StageDir, atomic_write, fingerprint
from patchcore_core.data import load_images
from patchcore_core.stages.fetch import FetchResult
from patchcore_core.stages.index import ModelResult
from patchcore_core.stages.score import ScoreResult

__all__ = ["MetricsResult", "run"]

_CASES = {"worst": "lowest-scored defects, highest-scored good images",
          "best": "highest-scored defects, lowest-scored good images"}


class MetricsResult(BaseModel):
    """`metrics` as in `patchcore_core.metrics.compute_metrics`, plus the figures written beside metrics.json."""

    directory: str
    category: str
    metrics: dict[str, Any]
    metrics_path: str
    figures: dict[str, str]
    fingerprint: str


def run(scores: ScoreResult, fetched: FetchResult, model: ModelResult, work_dir: str | os.PathLike,
        n_cases: int = 3, title: str = "") -> MetricsResult:
    """Compute and write metrics.json and the figures of one category's test split."""
    from patchcore_core.metrics import compute_metrics, plot_pro_curve, plot_roc_pr
    from patchcore_core.overlays import plot_overlays, select_cases

    category = scores.category
    out = StageDir.of(Path(work_dir) / "stages", category, "metrics",
                      fingerprint("metrics", scores.fingerprint, model.fingerprint, n_cases, title))
    if (done := out.finished()) is not None:
        return MetricsResult(**done)
    preds = pd.read_parquet(scores.predictions)
    maps = np.load(scores.maps, mmap_mode="r", allow_pickle=False)
    masks = np.load(scores.masks, mmap_mode="r", allow_pickle=False)
    labels, values = preds["label"].to_numpy(), preds["score"].to_numpy()
    calibration = json.loads((Path(model.model_dir) / CONFIG_FILE).read_text())["state"].get("calibration")
    metrics = compute_metrics(labels, values, masks, maps, calibration=calibration)
    metrics.update(category=category, n_test=int(len(preds)), n_anomalous=int(labels.sum()),
                   predict_seconds_per_image=scores.seconds_per_image)
    title = title or category
    figures = {
        "roc_pr": str(plot_roc_pr(labels, values, out / "roc_pr.png", title=title)),
        "pro_curve": str(plot_pro_curve(masks, maps, out / "pro_curve.png", title=f"{title}: PRO")),
    }
    root = Path(fetched.root) / category
    vmin, vmax = float(np.min(maps)), float(np.max(maps))
    for name, idx in select_cases(labels, values, n_cases).items():
        images = load_images([str(root / preds["relpath"][i]) for i in idx], resize=model.params.get("resize"),
                             image_size=int(model.params["image_size"]))
        captions = [f"{preds['defect_type'][i]} {values[i]:.3f}" for i in idx]
        figures[f"overlays_{name}"] = str(
            plot_overlays(images.numpy(), maps[idx], masks[idx], captions, out / f"overlays_{name}.png",
                          vmin=vmin, vmax=vmax, title=f"{title}: {name} cases ({_CASES[name]}; caption = score)")
        )
    with atomic_write(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    result = MetricsResult(directory=str(out.path), category=category, metrics=metrics,
                           metrics_path=str(out / METRICS_FILE), figures=figures, fingerprint=out.fingerprint)
    out.finish(result.model_dump(), outputs=[result.metrics_path, *figures.values()])
    return result
