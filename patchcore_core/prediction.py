"""Scoring new images for production: per image a score, the model's calibrated threshold and the decision, a
binary mask at the input resolution, and a heatmap a person can look at.

One writer for these outputs (`write_predictions`), shared by `patchcore predict` and the score-batch flow:

    <out>/predictions.parquet   path, name, score, threshold, is_anomalous, model_fingerprint (+ error rows)
    <out>/anomaly_maps.npy      float32 [N, S, S] maps of the centre crop, in the row order of the scored images
    <out>/masks/<name>.png      binary mask (0/255) at the input image's resolution (pixel threshold)
    <out>/heatmaps/<name>.png   the anomaly map over the image, at the input resolution

Maps are computed on the centre crop the model sees; mapped back, the border outside that crop is not inspected
(left at 0 in the mask and uncoloured in the heatmap).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from patchcore_core.artifacts import atomic_write

__all__ = ["input_geometry", "to_input_resolution", "output_names", "write_predictions", "PREDICTION_COLUMNS"]

PREDICTION_COLUMNS = ("path", "name", "score", "threshold", "is_anomalous", "model_fingerprint", "error")


def input_geometry(size: tuple[int, int], resize: int | None, image_size: int | None
                   ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized height, width), (crop top, left)) of the preprocessing (torchvision Resize(int) then
    CenterCrop) of an image of `size` = (width, height)."""
    w, h = size
    if resize is not None:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = int(resize), int(int(resize) * long / short)
        h, w = (new_long, new_short) if size[0] <= size[1] else (new_short, new_long)
    if image_size is None:
        return (h, w), (0, 0)
    return (h, w), (int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0)))


def to_input_resolution(anomaly_map: np.ndarray, size: tuple[int, int], resize: int | None,
                        image_size: int | None) -> np.ndarray:
    """An anomaly map [S, S] of the centre crop placed back into the resized frame (0 outside the crop) and
    resized bilinearly to the input image's (height, width)."""
    import torch
    import torch.nn.functional as F

    (h, w), (top, left) = input_geometry(size, resize, image_size)
    canvas = np.zeros((h, w), dtype=np.float32)
    s = anomaly_map.shape[0]
    t0, l0, t1, l1 = max(top, 0), max(left, 0), min(top + s, h), min(left + s, w)  # the crop inside the frame
    canvas[t0:t1, l0:l1] = anomaly_map[t0 - top : t1 - top, l0 - left : l1 - left]
    grid = torch.from_numpy(canvas)[None, None]
    out = F.interpolate(grid, size=(size[1], size[0]), mode="bilinear", align_corners=False)
    return out[0, 0].numpy()


def output_names(paths: Sequence[str]) -> list[str]:
    """A file stem per image, made unique (`name`, `name-1`, ...) so outputs of same-named files never clash."""
    seen: dict[str, int] = {}
    names = []
    for path in paths:
        stem = Path(str(path)).stem or "image"
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)
        count = seen.get(stem, 0)
        seen[stem] = count + 1
        names.append(stem if count == 0 else f"{stem}-{count}")
    return names


def _heatmap(image_path: str, amap: np.ndarray, vmin: float, vmax: float) -> Any:
    """The map over the image (jet colours, half transparent), at the input resolution."""
    from matplotlib import colormaps
    from PIL import Image

    with Image.open(image_path) as img:
        base = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    norm = np.clip((amap - vmin) / max(vmax - vmin, 1e-12), 0.0, 1.0)
    colours = colormaps["jet"](norm)[..., :3]
    alpha = 0.5 * (amap > vmin)[..., None]
    return Image.fromarray((255 * ((1 - alpha) * base + alpha * colours)).astype(np.uint8))


def write_predictions(out_dir: str | os.PathLike, model, paths: Sequence[str], scores: np.ndarray,
                      maps: np.ndarray, errors: dict[str, str] | None = None, model_fingerprint: str = "",
                      masks_and_heatmaps: bool = True, names: Sequence[str] | None = None,
                      extra: dict[str, Sequence] | None = None) -> Path:
    """Write predictions.parquet (one row per scored image, then one per failed image with its `error`), and
    the masks and heatmaps of the scored images. `names` (default: unique file stems) name the mask and heatmap
    files, scored images first; `extra` adds columns, one value per row in the same order. Returns the parquet
    path (written last)."""
    from PIL import Image

    from patchcore_core.data import read_image_size

    out = Path(out_dir)
    threshold = getattr(model, "threshold_", None)
    pixel_threshold = getattr(model, "pixel_threshold_", None)
    calibration = getattr(model, "calibration_", None) or {}
    names = list(names) if names is not None else output_names(list(paths) + list(errors or {}))
    if masks_and_heatmaps:
        vmin = calibration.get("pixel_quantiles", {}).get("q50", float(np.min(maps)) if len(maps) else 0.0)
        vmax = 2 * pixel_threshold - vmin if pixel_threshold is not None else float(np.max(maps) if len(maps) else 1)
        for path, name, amap in zip(paths, names, maps, strict=False):
            full = to_input_resolution(amap, read_image_size(str(path)), model.resize, model.image_size)
            if pixel_threshold is not None:
                with atomic_write(out / "masks" / f"{name}.png") as tmp:
                    Image.fromarray(((full >= pixel_threshold) * 255).astype(np.uint8), "L").save(tmp, "PNG")
            with atomic_write(out / "heatmaps" / f"{name}.png") as tmp:
                _heatmap(str(path), full, vmin, vmax).save(tmp, "PNG")
    rows = [{"path": str(p), "name": n, "score": float(s), "threshold": threshold,
             "is_anomalous": None if threshold is None else bool(s >= threshold),
             "model_fingerprint": model_fingerprint, "error": None}
            for p, n, s in zip(paths, names, scores, strict=False)]
    rows += [{"path": str(p), "name": n, "score": None, "threshold": threshold, "is_anomalous": None,
              "model_fingerprint": model_fingerprint, "error": reason}
             for (p, reason), n in zip((errors or {}).items(), names[len(paths):], strict=True)]
    with atomic_write(out / "anomaly_maps.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.asarray(maps, dtype=np.float32), allow_pickle=False)
    for column, values in (extra or {}).items():
        for row, value in zip(rows, values, strict=True):
            row[column] = value
    table = pd.DataFrame(rows, columns=[*PREDICTION_COLUMNS, *(extra or {})]).astype(
        {"score": "float64", "threshold": "float64", "is_anomalous": "boolean"})
    with atomic_write(out / "predictions.parquet") as tmp:
        table.to_parquet(tmp, index=False)
    return out / "predictions.parquet"
