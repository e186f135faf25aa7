"""Evaluate a detector on one MVTec-layout category and write every artifact needed to recompute its metrics."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from patchcore_core.artifacts import METRICS_FILE, atomic_write
from patchcore_core.data import CategoryListing, list_category, load_masks, screen_images
from patchcore_core.errors import DataError
from patchcore_core.metrics import compute_metrics, plot_roc_pr
from patchcore_core.stages.score import write_scores


@dataclass
class Evaluation:
    """Everything one evaluation produced, in test-listing row order."""

    listing: CategoryListing
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray
    metrics: dict[str, Any]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def screen_listing(listing: CategoryListing, skip_bad: bool, storage_options=None
                   ) -> tuple[CategoryListing, dict[str, str]]:
    """Check every train and test image before any work; bad ones fail at once, or are dropped with `skip_bad`."""
    samples = listing.train + listing.test
    _, bad = screen_images([s.path for s in samples], skip_bad, storage_options)
    kept = CategoryListing(listing.root, listing.category, [s for s in listing.train if s.path not in bad],
                           [s for s in listing.test if s.path not in bad])
    for split, left in (("train", kept.train), ("test", kept.test)):
        if not left:
            raise DataError(f"{listing.root}/{listing.category}: no usable {split} image left after skipping "
                            f"{len(bad)} bad file(s)")
    return kept, bad


def evaluate_model(model, listing: CategoryListing, fit: bool, storage_options=None,
                   skip_bad: bool = False) -> Evaluation:
    """Check every image, fit on the train split (if `fit`), score the test split, compute the metrics with
    timings. With `skip_bad`, unusable images are left out and listed in `metrics["skipped"]`, and the
    metrics are marked `incomplete`."""
    listing, skipped = screen_listing(listing, skip_bad, storage_options)
    fit_seconds = 0.0
    if fit:
        start = time.perf_counter()
        model.fit([s.path for s in listing.train])
        fit_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores, maps = model.predict([s.path for s in listing.test])
    predict_seconds = time.perf_counter() - start
    masks = load_masks(listing.test, model.resize, model.image_size, storage_options, check_size=True)
    labels = np.array([s.label for s in listing.test])
    metrics = compute_metrics(labels, scores, masks, maps, calibration=getattr(model, "calibration_", None))
    metrics.update(
        category=listing.category,
        n_train=len(listing.train),
        n_test=len(listing.test),
        fit_seconds=round(fit_seconds, 3),
        predict_seconds_per_image=round(predict_seconds / max(1, len(listing.test)), 5),
        peak_rss_mb=round(peak_rss_mb(), 1),
        incomplete=bool(skipped),
        skipped=skipped,
    )
    return Evaluation(listing, scores, maps, masks, metrics)


def write_evaluation(result: Evaluation, out_dir: str | os.PathLike) -> Path:
    """Write predictions.parquet, anomaly_maps.npy, gt_masks.npy, roc_pr.png, then metrics.json last.

    Each file is written under a temporary name and renamed; metrics.json appearing marks a complete result.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / METRICS_FILE).unlink(missing_ok=True)
    write_scores(out, result.listing, result.scores, result.maps, result.masks)
    labels = np.array([s.label for s in result.listing.test])
    plot_roc_pr(labels, result.scores, out / "roc_pr.png", title=result.listing.category)
    with atomic_write(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(result.metrics, indent=2))
    return out


def evaluate_category(
    model, data: str, category: str, out_dir: str | os.PathLike, fit: bool = True, storage_options=None,
    skip_bad: bool = False,
) -> Evaluation:
    """List the category, evaluate `model` on it and write the artifacts under `out_dir`."""
    listing = list_category(data, category, storage_options=storage_options)
    result = evaluate_model(model, listing, fit=fit, storage_options=storage_options, skip_bad=skip_bad)
    write_evaluation(result, out_dir)
    return result


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """The one Markdown table writer (GitHub layout); cells are printed as given."""
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of per-category metrics with the mean row, in the paper's Table S1–S3 layout."""
    cols = ["image_auroc", "pixel_auroc", "au_pro", "fpr@calibrated", "tpr@calibrated", "misclassified (oracle F1)",
            "fit_seconds", "predict_seconds_per_image"]
    rows = [{**r, "fpr@calibrated": (r.get("operating_point") or {}).get("fpr"),
             "tpr@calibrated": (r.get("operating_point") or {}).get("tpr"),
             "misclassified (oracle F1)": r.get("misclassified")} for r in rows]
    body = [[row["category"] + (" (incomplete)" if row.get("incomplete") else ""), *(_fmt(row.get(c)) for c in cols)]
            for row in rows]
    if len(rows) > 1:
        present = {c: [r[c] for r in rows if r.get(c) is not None] for c in cols}
        means = {c: float(np.mean(v)) if v else None for c, v in present.items()}
        body.append(["**mean**", *(_fmt(means[c]) for c in cols)])
    return markdown_table(["category", *cols], body)


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
