"""Paper-style experiment report: PatchCore vs SPADE vs PaDiM on MVTec-layout categories, with ablations.

`run_paper_report(data, categories, out_dir, ...) -> ReportResult` runs the grid of the PatchCore paper's
tables (1/S1, 2/S2/S3, 5, §4.3, §4.4.2, the ablations) on one or more categories and writes one Markdown
report with the published numbers beside ours where the setting matches, plus figures (ROC/PR curves per
category as the supplement's fig. S3, heatmap overlays). `ReportResult.tables` holds every table as a
DataFrame for MLflow / Prefect artifacts.

Features are computed once and reused: the backbone runs once per (category, image size) over the train and
test images, keeping the raw layer maps; every PatchCore setting (layers, patch size) is aggregated from them,
and its train/test patch features are computed once and shared by the coreset ratios, random-vs-greedy,
Flat-vs-IVFPQ and reweighting variants (`PatchCore.fit_memory_bank` / `score_features`). SPADE and PaDiM fit
from the same layer maps (`fit_features` / `score_features`). Greedy coresets of several ratios are prefixes of
one greedy run when the sampler returns points in selection order (the k-center greedy is incremental).
Inference times are measured separately, end to end (`predict` on preprocessed images: backbone, search,
upsampling and blur), on `timing_images` test images after one warm-up image.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from patchcore_core import __version__
from patchcore_core.baselines import SPADE, PaDiM
from patchcore_core.baselines._common import hierarchy_layers
from patchcore_core.io_utils import atomic_write
from patchcore_core.metrics import compute_metrics
from patchcore_core.runtime import configure_threads, resolve_device

log = logging.getLogger(__name__)

__all__ = ["ReportConfig", "ReportResult", "run_paper_report", "rebuild_report", "PAPER", "EXPERIMENTS"]

EXPERIMENTS = (
    "main",  # Table 1/S1 + 2/S2/S3: SPADE, PaDiM, PatchCore at the coreset ratios
    "subsampling",  # §4.4.2: greedy coreset vs random subsampling at the same ratios
    "search",  # §4.3: PatchCore-100% with exact (Flat) vs approximate (IVFPQ) search
    "timing",  # Table 5: seconds per image, end to end
    "reweighting",  # eq. 7 on/off at the coreset ratios
    "patch_size",  # neighbourhood P
    "layers",  # feature hierarchies
    "image_size",  # input resolution
    "lowshot",  # 1..50 nominal train images, all three methods
    "spade_layers",  # SPADE pyramid levels (SPADE paper Table 6)
)

# ------------------------------------------------------------------------------------------------------------
# Published numbers (%, WideResNet-50, 224x224 unless said otherwise): PatchCore paper Tables 1, 2, S1–S4,
# the spec's Table 5 times, and the SPADE paper's Table 6 (PRO per pyramid level).

PAPER_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw", "tile",
    "toothbrush", "transistor", "wood", "zipper",
)
# Rows: method, then mean and the 15 categories in the order above (the paper's column order).
_TABLES = {
    "image_auroc": """
PatchCore-25% 99.1 100 99.5 98.1 98.7 98.2 100 100 100 96.6 98.1 98.7 100 100 99.2 99.4
PatchCore-10% 99.0 100 99.4 97.8 98.7 97.9 100 100 100 96.0 97.0 98.9 99.7 100 99.0 99.5
PatchCore-1% 99.0 100 99.3 98.0 98.0 98.6 100 100 99.7 97.0 96.4 99.4 100 99.9 99.2 99.2
""",
    "pixel_auroc": """
SPADE 96.0 98.4 97.2 99.0 97.5 93.7 99.1 97.6 98.1 96.5 98.9 87.4 97.9 94.1 88.5 96.5
PaDiM 97.5 98.3 96.7 98.5 99.1 97.3 98.2 99.2 97.2 95.7 98.5 94.1 98.8 98.5 94.9 98.5
PatchCore-25% 98.1 98.6 98.4 98.8 99.0 98.7 98.7 99.3 98.4 97.4 99.4 95.6 98.7 96.3 95.0 98.8
PatchCore-10% 98.1 98.6 98.5 98.9 99.1 98.7 98.7 99.3 98.4 97.6 99.4 95.9 98.7 96.4 95.1 98.9
PatchCore-1% 98.0 98.5 98.2 98.8 98.9 98.6 98.6 99.3 98.4 97.1 99.2 96.1 98.5 94.9 95.1 98.8
""",
    "au_pro": """
SPADE 91.7 95.5 90.9 93.7 94.7 86.7 95.4 97.2 94.4 94.6 96.0 75.6 93.5 87.4 87.4 92.6
PaDiM 92.1 94.8 88.8 93.5 96.2 94.6 92.6 97.8 85.6 92.7 94.4 86.0 93.1 84.5 91.1 95.9
PatchCore-25% 93.4 96.2 92.5 95.5 96.6 96.0 93.8 98.9 91.4 93.2 97.9 87.3 91.5 83.7 89.4 97.1
PatchCore-10% 93.5 96.1 92.6 95.5 96.6 95.9 93.9 98.9 91.3 94.1 97.9 87.4 91.4 83.5 89.6 97.1
PatchCore-1% 93.1 95.9 91.6 95.5 96.5 96.1 93.8 98.9 91.2 92.9 97.1 88.3 90.2 81.2 89.5 97.0
""",
    # Table S4: PatchCore-1%, WideResNet-101, image size 280, hierarchies (2, 3) and (1, 2, 3).
    "s4": """
(2,3)/image_auroc 99.4 100 99.6 98.2 98.4 99.8 100 100 100 97.2 98.9 98.9 100 100 99.5 99.9
(2,3)/pixel_auroc 98.2 98.6 98.4 99.1 98.7 98.7 98.8 99.3 98.8 97.8 99.3 96.1 98.8 96.4 95.1 98.9
(2,3)/au_pro 94.4 96.6 93.8 96.0 97.4 96.8 91.2 99.1 94.8 94.0 97.5 89.5 95.5 84.8 91.7 97.8
(1,2,3)/image_auroc 99.2 100 99.7 98.1 98.2 98.3 100 100 100 97.1 99.0 98.9 98.9 99.7 99.9 99.7
(1,2,3)/pixel_auroc 98.4 98.6 98.7 99.1 98.7 98.8 98.8 99.3 99.0 98.6 99.5 96.3 98.9 97.1 95.2 99.0
(1,2,3)/au_pro 95.0 96.6 94.6 96.3 97.5 97.0 91.5 99.1 95.4 96.0 98.1 90.0 95.8 85.9 92.0 98.0
""",
}
# SPADE paper Table 6 (PRO %): one pyramid level (its grid at 224: 14 = level 3, 28 = level 2, 56 = level 1)
# vs all three. Its rows are in a different category order, so they are given by name.
_SPADE_T6 = {
    "carpet": (93.5, 93.4, 91.0, 94.7), "grid": (80.9, 88.0, 89.1, 86.7), "leather": (96.6, 97.5, 97.3, 97.2),
    "tile": (74.5, 65.9, 73.8, 75.9), "wood": (84.7, 87.7, 87.5, 87.4), "bottle": (93.7, 94.7, 88.3, 95.5),
    "cable": (89.3, 87.3, 73.5, 90.9), "capsule": (90.5, 92.8, 91.4, 93.7), "hazelnut": (92.7, 95.8, 96.2, 95.4),
    "metal_nut": (91.3, 93.1, 86.1, 94.4), "pill": (89.2, 94.4, 96.3, 94.6), "screw": (90.7, 95.9, 96.1, 96.0),
    "toothbrush": (90.9, 93.5, 94.5, 93.5), "transistor": (91.3, 72.1, 62.5, 87.4),
    "zipper": (90.9, 92.4, 92.5, 92.6), "mean": (89.38, 89.6, 87.74, 91.7),
}


def _parse_paper() -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for metric, text in _TABLES.items():
        for line in text.strip().splitlines():
            name, *values = line.split()
            cols = ("mean", *PAPER_CATEGORIES)
            if metric == "s4":
                hier, sub = name.split("/")
                out.setdefault(f"s4{hier}", {}).setdefault(sub, {}).update(zip(cols, map(float, values), strict=True))
            else:
                out.setdefault(metric, {})[name] = dict(zip(cols, map(float, values), strict=True))
    out["image_auroc"]["SPADE"] = {"mean": 85.5}
    out["image_auroc"]["PaDiM"] = {"mean": 95.3}
    # Table 1: misclassified images at the F1-optimal threshold, summed over all 15 categories.
    out["misclassified"] = {"PatchCore-25%": {"total": 42}, "PatchCore-10%": {"total": 47},
                            "PatchCore-1%": {"total": 49}}
    levels = {"(3,)": 0, "(2,)": 1, "(1,)": 2, "(1,2,3)": 3}
    out["spade_pro"] = {lv: {cat: vals[i] for cat, vals in _SPADE_T6.items()} for lv, i in levels.items()}
    # Paper Table 5 (GPU, WRN-50, backbone included), seconds per image.
    out["seconds_per_image"] = {"PatchCore-100%": {"gpu": 0.60}, "PatchCore-10%": {"gpu": 0.22},
                                "PatchCore-1%": {"gpu": 0.17}}
    return out


PAPER = _parse_paper()


# ------------------------------------------------------------------------------------------------------------
# configuration and result


@dataclass
class ReportConfig:
    """Every setting of the experiment grid; the defaults are the paper's where one applies."""

    backbone: str = "efficientnet_lite0"
    weights: str | None = None
    resize: int | None = 256  # other image sizes scale it by the same 256/224 ratio
    image_size: int = 224
    coreset_ratios: tuple[float, ...] = (0.25, 0.1, 0.01)
    heatmap_ratio: float = 0.1  # the PatchCore variant drawn in the overlays
    ablation_ratio: float = 0.01  # coreset ratio of the patch-size / layer / image-size ablations (Table S4: 1%)
    lowshot_ratio: float = 0.1
    lowshot_sizes: tuple[int, ...] = (1, 5, 10, 16, 50)
    patch_sizes: tuple[int, ...] = (1, 3, 5)
    layer_sets: tuple[tuple[int, ...], ...] = ((2,), (3,), (2, 3), (1, 2, 3))  # hierarchy levels
    image_sizes: tuple[int, ...] = (224, 280, 320)
    reweight_neighbors: int = 9  # b of eq. 7 (anomalib's value)
    spade_k: int = 50
    spade_layer_sets: tuple[tuple[int, ...], ...] = ((3,), (2,), (1,), (1, 2, 3))
    padim_features: int | None = None
    patch_size: int = 3
    layers: tuple[int, ...] = (2, 3)
    timing_images: int = 16
    heatmap_rows: int = 4
    experiments: tuple[str, ...] = EXPERIMENTS
    device: str = "auto"
    seed: int = 0
    batch_size: int = 16
    num_threads: int | None = None
    progress: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.experiments) - set(EXPERIMENTS)
        if unknown:
            raise ValueError(f"unknown experiment(s) {sorted(unknown)}; choose from {list(EXPERIMENTS)}")
        if not self.coreset_ratios:
            raise ValueError("coreset_ratios must not be empty")


@dataclass
class ReportResult:
    """What `run_paper_report` produced. `tables` are the report's tables as DataFrames (for artifacts)."""

    markdown: str
    report_path: Path
    figure_paths: list[Path]
    tables: dict[str, pd.DataFrame]
    rows: list[dict[str, Any]]
    wall_seconds: float
    device: str
    acceptance: dict[str, bool] = field(default_factory=dict)

    def write_tables(self, directory: str | os.PathLike) -> list[Path]:
        """Write every table as CSV under `directory` (e.g. for `mlflow.log_artifacts`)."""
        paths = []
        for name, table in self.tables.items():
            path = Path(directory) / f"{name}.csv"
            with atomic_write(path) as tmp:
                table.to_csv(tmp, index=False)
            paths.append(path)
        return paths


# ------------------------------------------------------------------------------------------------------------
# helpers: labels, devices, timing


def ratio_label(ratio: float) -> str:
    return f"PatchCore-{ratio * 100:g}%"


def _resize_for(cfg: ReportConfig, size: int) -> int | None:
    """The resize (shorter side) that goes with a crop size, keeping the reference 256/224 ratio."""
    if cfg.resize is None:
        return None
    return int(round(size * cfg.resize / cfg.image_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device, threads: int) -> str:
    """A human-readable name of the compute device (GPU model, or CPU model with the thread count)."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {threads} threads"


def _clock(device: torch.device) -> float:
    _sync(device)
    return time.perf_counter()


# ------------------------------------------------------------------------------------------------------------
# feature caches


@dataclass
class _SizeCache:
    """Backbone layer maps of one category at one image size: train and test, CPU float32 tensors."""

    size: int
    resize: int | None
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]
    test_images: torch.Tensor
    masks: np.ndarray
    backbone_seconds_per_image: float


class _Runner:
    """Runs the grid for one category and collects result rows."""

    def __init__(self, cfg: ReportConfig, listing, storage_options: dict | None, device: torch.device,
                 figures_dir: Path, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.listing = listing
        self.category = listing.category
        self.storage_options = storage_options
        self.device = device
        self.figures_dir = figures_dir
        self.say = say
        self.levels = hierarchy_layers(cfg.backbone)
        self.labels = np.array([s.label for s in listing.test], dtype=np.int64)
        self.rows: list[dict[str, Any]] = []
        self.figures: list[Path] = []
        self.models: dict[str, Any] = {}
        self.kept_maps: dict[str, np.ndarray] = {}
        self.kept_scores: dict[str, np.ndarray] = {}
        self._extractors: dict[tuple[str, ...], Any] = {}
        self._default_ablation: tuple | None = None

    # -------------------------------------------------------------- features
    def _extractor(self, layers: tuple[str, ...]):
        from patchcore_core.backbones import FeatureExtractor

        if layers not in self._extractors:
            self._extractors[layers] = FeatureExtractor(self.cfg.backbone, layers, self.cfg.weights, self.device)
        return self._extractors[layers]

    def _layer_maps(self, paths: list[str], size: int, resize: int | None, layers: tuple[str, ...],
                    keep_images: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
        from patchcore_core.data import load_images

        extractor = self._extractor(layers)
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        images, seconds = [], 0.0
        for start in range(0, len(paths), self.cfg.batch_size):
            batch = load_images(paths[start : start + self.cfg.batch_size], resize=resize, image_size=size,
                                storage_options=self.storage_options, num_workers=2)
            t0 = _clock(self.device)
            out = extractor(batch.to(self.device))
            seconds += _clock(self.device) - t0
            for layer in layers:
                parts[layer].append(out[layer].float().cpu())
            if keep_images:
                images.append(batch)
        maps = {layer: torch.cat(p) for layer, p in parts.items()}
        return maps, (torch.cat(images) if keep_images else None), seconds

    def size_cache(self, size: int, layers: tuple[str, ...]) -> _SizeCache:
        from patchcore_core.data import load_masks

        resize = _resize_for(self.cfg, size)
        t0 = time.perf_counter()
        train, _, _ = self._layer_maps([s.path for s in self.listing.train], size, resize, layers, False)
        test, images, seconds = self._layer_maps([s.path for s in self.listing.test], size, resize, layers, True)
        masks = load_masks(self.listing.test, resize, size, self.storage_options, num_workers=2)
        self.say(f"{self.category}: layer maps at {size}px ({', '.join(layers)}) in {time.perf_counter() - t0:.1f}s")
        return _SizeCache(size, resize, train, test, images, masks, seconds / max(1, len(self.listing.test)))

    # -------------------------------------------------------------- bookkeeping
    def record(self, experiment: str, method: str, setting: str, scores: np.ndarray, maps: np.ndarray | None,
               masks: np.ndarray | None, **extra: Any) -> dict[str, Any]:
        metrics = compute_metrics(self.labels, scores, masks if maps is not None else None, maps)
        row = {"category": self.category, "experiment": experiment, "method": method, "setting": setting,
               **{k: metrics[k] for k in ("image_auroc", "pixel_auroc", "au_pro", "misclassified",
                                          "error_at_full_recall")}, **extra}
        self.rows.append(row)
        pix = "" if row["pixel_auroc"] is None else f" pixel {row['pixel_auroc']:.4f} PRO {row['au_pro']:.4f}"
        self.say(f"{self.category}: [{experiment}] {method} {setting}: image {row['image_auroc']:.4f}{pix}")
        return row

    # -------------------------------------------------------------- PatchCore
    def patchcore_base(self, layers: Sequence[str], patch_size: int, size: int, resize: int | None):
        from patchcore_core.model import PatchCore

        model = PatchCore(backbone=self.cfg.backbone, layers=list(layers), weights=self.cfg.weights,
                          patch_size=patch_size, resize=resize, image_size=size, device=str(self.device),
                          seed=self.cfg.seed, batch_size=self.cfg.batch_size, progress=self.cfg.progress)
        model._setup()  # builds the backbone and the aggregator; the variants below share them
        return model

    @staticmethod
    def variant(base, **changes):
        """A PatchCore with `base`'s params changed, sharing its already-built backbone and aggregator."""
        model = type(base)(**{**base.get_params(), **changes})
        model.device_, model.extractor_, model.aggregator_ = base.device_, base.extractor_, base.aggregator_
        return model

    def patch_features(self, base, maps: dict[str, torch.Tensor]) -> tuple[np.ndarray, tuple[int, int]]:
        """PatchCore patch features [N, h*w, D] from cached layer maps (same aggregator as `PatchCore.embed`)."""
        layers = list(base.extractor_.layers)
        n = len(maps[layers[0]])
        out, grid = None, None
        for start in range(0, n, self.cfg.batch_size):
            sl = slice(start, start + self.cfg.batch_size)
            feats, grid = base.aggregator_([maps[layer][sl].to(self.device) for layer in layers])
            feats = feats.float().cpu().numpy()
            if out is None:
                out = np.empty((n, feats.shape[1], feats.shape[2]), dtype=np.float32)
            out[sl] = feats
        return out, grid

    def score_patchcore(self, model, test_feats: np.ndarray, size: int,
                        with_worst: bool = False) -> tuple[np.ndarray, np.ndarray, float] | tuple:
        """Image scores, maps and search + map seconds per image; with `with_worst`, also each image's most
        anomalous patch feature [N, D] (the argmax patch that the image score and eq. 7 are taken at)."""
        from patchcore_core.scoring import anomaly_maps

        scores, maps, worst = [], [], []
        t0 = _clock(self.device)
        for start in range(0, len(test_feats), self.cfg.batch_size):
            feats = test_feats[start : start + self.cfg.batch_size]
            s, grids = model.score_features(feats)
            scores.append(s)
            maps.append(anomaly_maps(grids, size))
            if with_worst:
                worst.append(feats[np.arange(len(feats)), grids.reshape(len(feats), -1).argmax(axis=1)])
        seconds = (_clock(self.device) - t0) / max(1, len(test_feats))
        out = (np.concatenate(scores), np.concatenate(maps), seconds)
        return (*out, np.concatenate(worst)) if with_worst else out

    def reweighted_scores(self, base, model, worst_feats: np.ndarray) -> np.ndarray:
        """Eq. 7 image scores of `model`'s bank, searching only each image's most anomalous patch.

        The image score is taken at the argmax patch, so scoring that one patch per image (a 1x1 "grid")
        gives the same reweighted score as `score_features` on all patches, at 1/(h*w) of the search.
        """
        rw = self.variant(base, coreset_ratio=model.coreset_ratio, reweight_neighbors=self.cfg.reweight_neighbors)
        rw.fit_memory_bank(model.memory_bank_, model.feature_grid_, n_train_patches=model.n_train_patches_)
        rw.feature_grid_ = (1, 1)
        return rw.score_features(worst_feats[:, None, :])[0]

    def greedy_selections(self, bank: np.ndarray, ratios: Sequence[float]) -> tuple[dict[float, np.ndarray], float]:
        """Greedy coreset indices per ratio, reusing one run of the largest ratio where that is exact.

        Greedy k-center is incremental: with the same projection and starts, the first k points chosen for
        a larger ratio are the k points chosen for a smaller one, when `select` returns them in selection
        order. That is checked here on the data: the smallest ratio is also selected on its own and compared
        with the prefix; only if they agree are the ratios in between taken as prefixes too.
        """
        from patchcore_core import sampler as sampler_module

        ratios = sorted(set(ratios), reverse=True)
        t0 = time.perf_counter()

        def select(ratio: float) -> np.ndarray:
            s = sampler_module.make_sampler("greedy", ratio, projection_dim=128, seed=self.cfg.seed,
                                            device=str(self.device), progress=self.cfg.progress)
            return np.asarray(s.select(bank), dtype=np.int64)

        out = {ratios[0]: select(ratios[0])}
        if len(ratios) > 1:
            smallest = select(ratios[-1])
            nested = np.array_equal(out[ratios[0]][: len(smallest)], smallest)
            out[ratios[-1]] = smallest
            for ratio in ratios[1:-1]:
                out[ratio] = out[ratios[0]][: _coreset_size(ratio, len(bank))] if nested else select(ratio)
            self.say(f"{self.category}: greedy selection order {'verified' if nested else 'NOT nested'}: "
                     f"{'prefixes reused' if nested else 'each ratio selected separately'}")
        return out, time.perf_counter() - t0

    # -------------------------------------------------------------- experiments
    def run(self) -> None:
        cfg = self.cfg
        exps = set(cfg.experiments)
        lv = self.levels
        base_layers = tuple(dict.fromkeys([lv[1], lv[2], lv[3], lv[4]]))
        cache = self.size_cache(cfg.image_size, base_layers)
        size = cfg.image_size
        pc_layers = [lv[i] for i in cfg.layers]

        # ---- PatchCore main features, shared by every variant at the default setting
        base = self.patchcore_base(pc_layers, cfg.patch_size, size, cache.resize)
        train_feats, grid = self.patch_features(base, cache.train)
        test_feats, _ = self.patch_features(base, cache.test)
        bank = train_feats.reshape(-1, train_feats.shape[-1])
        del train_feats
        n_patches = len(bank)

        ratios = list(cfg.coreset_ratios)
        want_ablation_ratio = exps & {"patch_size", "layers", "image_size"}
        greedy_ratios = ratios + ([cfg.ablation_ratio] if want_ablation_ratio else [])
        selections, selection_seconds = self.greedy_selections(bank, greedy_ratios)
        self.say(f"{self.category}: greedy coresets {sorted(selections)} of {n_patches} in {selection_seconds:.1f}s")

        pc_models = {}
        for ratio in ratios:
            model = self.variant(base, coreset_ratio=ratio, coreset_method="greedy")
            model.fit_memory_bank(bank[selections[ratio]], grid, n_train_patches=n_patches)
            scores, maps, sec, worst = self.score_patchcore(model, test_feats, size, with_worst=True)
            label = ratio_label(ratio)
            self.record("main", label, "greedy", scores, maps, cache.masks, bank_size=len(model.memory_bank_),
                        score_seconds_per_image=sec, selection_seconds=selection_seconds)
            pc_models[label] = model
            if ratio == cfg.heatmap_ratio:
                self.kept_maps[label] = maps
            self.kept_scores[label] = scores
            if "reweighting" in exps:
                rw_scores = self.reweighted_scores(base, model, worst)
                self.record("reweighting", label, f"eq. 7 on (b = {cfg.reweight_neighbors})", rw_scores, None, None)
                self.record("reweighting", label, "eq. 7 off", scores, None, None)
            del maps

        if "subsampling" in exps:
            for ratio in ratios:
                model = self.variant(base, coreset_ratio=ratio, coreset_method="random")
                t0 = time.perf_counter()
                model.fit_features(bank, grid)
                fit_s = time.perf_counter() - t0
                scores, maps, sec = self.score_patchcore(model, test_feats, size)
                self.record("subsampling", ratio_label(ratio), "random", scores, maps, cache.masks,
                            bank_size=len(model.memory_bank_), score_seconds_per_image=sec, selection_seconds=fit_s)
                del maps

        if want_ablation_ratio:  # the ablations' default setting, from the main features
            model = self.variant(base, coreset_ratio=cfg.ablation_ratio, coreset_method="greedy")
            model.fit_memory_bank(bank[selections[cfg.ablation_ratio]], grid, n_train_patches=n_patches)
            scores, maps, sec = self.score_patchcore(model, test_feats, size)
            self._default_ablation = (scores, maps, sec, len(model.memory_bank_), grid_of(model))
            del model

        if exps & {"search", "timing"}:
            for kind in ("flat", "ivfpq"):
                model = self.variant(base, coreset_ratio=1.0, coreset_method="none", index=kind)
                t0 = time.perf_counter()
                model.fit_memory_bank(bank, grid, n_train_patches=n_patches)
                index_s = time.perf_counter() - t0
                label = "PatchCore-100%" + (" IVFPQ" if kind == "ivfpq" else "")
                if "search" in exps:
                    scores, maps, sec = self.score_patchcore(model, test_feats, size)
                    self.record("search", "PatchCore-100%", kind, scores, maps, cache.masks, bank_size=n_patches,
                                score_seconds_per_image=sec, index_seconds=index_s)
                    del maps
                pc_models[label] = model

        # ---- baselines from the same layer maps
        spade = SPADE(backbone=cfg.backbone, weights=cfg.weights, k_images=cfg.spade_k, resize=cache.resize,
                      image_size=size, device=str(self.device), seed=cfg.seed, batch_size=cfg.batch_size,
                      progress=cfg.progress)
        padim = PaDiM(backbone=cfg.backbone, weights=cfg.weights, n_features=cfg.padim_features, resize=cache.resize,
                      image_size=size, device=str(self.device), seed=cfg.seed, batch_size=cfg.batch_size,
                      progress=cfg.progress)
        for name, model in (("SPADE", spade), ("PaDiM", padim)):
            t0 = time.perf_counter()
            model.fit_features(_map_batches(cache.train, cfg.batch_size))
            fit_s = time.perf_counter() - t0
            scores, maps, sec = self.score_baseline(model, cache.test)
            setting = (f"K = {model.k_images}, layers {', '.join(model.resolved_layers()[0])}" if name == "SPADE"
                       else f"d = {model.resolved_n_features()} of {model.total_channels()}")
            self.record("main", name, setting, scores, maps, cache.masks, fit_seconds=fit_s,
                        score_seconds_per_image=sec, state_mb=_state_mb(model))
            self.kept_maps[name], self.kept_scores[name] = maps, scores
            pc_models[name] = model

        if "spade_layers" in exps:
            for levels in cfg.spade_layer_sets:
                layers = [lv[i] for i in levels]
                if layers == spade.resolved_layers()[0]:  # the main SPADE run
                    main_row = next(r for r in self.rows if r["experiment"] == "main" and r["method"] == "SPADE")
                    self.rows.append({**main_row, "experiment": "spade_layers", "setting": _levels_key(levels),
                                      "grids": "/".join(str(cache.test[la].shape[-1]) for la in layers),
                                      "layers": ", ".join(layers)})
                    continue
                model = SPADE(backbone=cfg.backbone, layers=layers, k_images=cfg.spade_k, resize=cache.resize,
                              image_size=size, device=str(self.device), progress=False)
                model.fit_features(_map_batches(cache.train, cfg.batch_size))
                scores, maps, _ = self.score_baseline(model, cache.test)
                grids = "/".join(str(cache.test[layer].shape[-1]) for layer in layers)
                self.record("spade_layers", "SPADE", _levels_key(levels), scores, maps, cache.masks, grids=grids,
                            layers=", ".join(layers))
                del maps

        if "timing" in exps:
            self.timing(pc_models, cache)

        self.figures += self.plot_figures(cache)
        self.kept_maps.clear()

        if "lowshot" in exps:
            self.lowshot(base, bank, grid, test_feats, cache)
        del bank, test_feats, pc_models

        if want_ablation_ratio:
            self.ablations(cache)
            self._default_ablation = None

    def score_baseline(self, model, test_maps: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, float]:
        scores, maps = [], []
        t0 = _clock(self.device)
        for batch in _map_batches(test_maps, self.cfg.batch_size):
            s, m = model.score_features(batch)
            scores.append(s)
            maps.append(m)
        seconds = (_clock(self.device) - t0) / max(1, len(self.labels))
        return np.concatenate(scores), np.concatenate(maps), seconds

    def timing(self, models: dict[str, Any], cache: _SizeCache) -> None:
        """End-to-end seconds per image of `predict` on preprocessed test images (after one warm-up image)."""
        n = min(self.cfg.timing_images, len(cache.test_images))
        images = cache.test_images[:n]
        order = ["SPADE", "PaDiM", "PatchCore-100%", "PatchCore-100% IVFPQ",
                 *[ratio_label(r) for r in sorted(self.cfg.coreset_ratios, reverse=True)]]
        for name in order:
            model = models.get(name)
            if model is None:
                continue
            model.predict(images[:1])  # warm-up: builds the baselines' backbones, first-call allocations
            t0 = _clock(self.device)
            model.predict(images)
            seconds = (_clock(self.device) - t0) / n
            t0 = _clock(self.device)
            if hasattr(model, "extractor_"):
                for start in range(0, n, self.cfg.batch_size):
                    model.extractor_(images[start : start + self.cfg.batch_size].to(self.device))
            backbone = (_clock(self.device) - t0) / n
            size = (f"{len(model.memory_bank_)} patches, {_state_mb(model):.1f} MB" if hasattr(model, "memory_bank_")
                    else f"{_state_mb(model):.1f} MB state")
            row = {"category": self.category, "experiment": "timing", "method": name, "setting": size,
                   "seconds_per_image": seconds, "backbone_seconds_per_image": backbone, "timing_images": n}
            self.rows.append(row)
            self.say(f"{self.category}: [timing] {name}: {seconds:.4f} s/img (backbone {backbone:.4f})")

    def lowshot(self, base, bank: np.ndarray, grid, test_feats: np.ndarray, cache: _SizeCache) -> None:
        cfg = self.cfg
        n_train = len(self.listing.train)
        per_image = grid[0] * grid[1]
        rng = np.random.default_rng(cfg.seed)
        for n in cfg.lowshot_sizes:
            if n > n_train:
                continue
            subset = np.sort(rng.choice(n_train, n, replace=False))
            rows = (subset[:, None] * per_image + np.arange(per_image)[None, :]).reshape(-1)
            model = self.variant(base, coreset_ratio=cfg.lowshot_ratio, coreset_method="greedy")
            model.fit_features(bank[rows], grid)
            scores, maps, _ = self.score_patchcore(model, test_feats, cache.size)
            self.record("lowshot", ratio_label(cfg.lowshot_ratio), str(n), scores, maps, cache.masks, n_train=n)
            train_maps = {layer: m[torch.from_numpy(subset)] for layer, m in cache.train.items()}
            for model in (
                SPADE(backbone=cfg.backbone, k_images=cfg.spade_k, resize=cache.resize, image_size=cache.size,
                      device=str(self.device), progress=False),
                PaDiM(backbone=cfg.backbone, n_features=cfg.padim_features, resize=cache.resize,
                      image_size=cache.size, device=str(self.device), seed=cfg.seed, progress=False),
            ):
                model.fit_features(_map_batches(train_maps, cfg.batch_size))
                scores, maps, _ = self.score_baseline(model, cache.test)
                self.record("lowshot", model.MODEL_NAME, str(n), scores, maps, cache.masks, n_train=n)
            del maps

    def ablations(self, cache: _SizeCache) -> None:
        """Patch size, layer sets and image size, PatchCore at `ablation_ratio` (greedy, Flat)."""
        cfg = self.cfg
        exps = set(cfg.experiments)
        lv = self.levels
        label = ratio_label(cfg.ablation_ratio)
        default_key = (tuple(cfg.layers), cfg.patch_size, cfg.image_size)

        def run_one(experiment: str, setting: str, levels: tuple[int, ...], patch: int, c: _SizeCache) -> None:
            if (tuple(levels), patch, c.size) == default_key:  # computed in run() from the main features
                scores, maps, sec, bank_size, grid = self._default_ablation
            else:
                base = self.patchcore_base([lv[i] for i in levels], patch, c.size, c.resize)
                train_feats, g = self.patch_features(base, c.train)
                bank = train_feats.reshape(-1, train_feats.shape[-1])
                del train_feats
                model = self.variant(base, coreset_ratio=cfg.ablation_ratio, coreset_method="greedy")
                t0 = time.perf_counter()
                model.fit_features(bank, g)
                self.say(f"{self.category}: {setting}: coreset {len(model.memory_bank_)} of {len(bank)} "
                         f"in {time.perf_counter() - t0:.1f}s")
                del bank
                test_feats, _ = self.patch_features(base, c.test)
                scores, maps, sec = self.score_patchcore(model, test_feats, c.size)
                bank_size, grid = len(model.memory_bank_), grid_of(model)
            self.record(experiment, label, setting, scores, maps, c.masks, bank_size=bank_size, grid=grid,
                        score_seconds_per_image=sec)

        if "patch_size" in exps:
            for p in cfg.patch_sizes:
                run_one("patch_size", f"P = {p}", tuple(cfg.layers), p, cache)
        if "layers" in exps:
            for levels in cfg.layer_sets:
                run_one("layers", _levels_key(levels), tuple(levels), cfg.patch_size, cache)
        if "image_size" in exps:
            for s in cfg.image_sizes:
                if s == cache.size:
                    c = cache
                else:
                    c = self.size_cache(s, tuple(lv[i] for i in cfg.layers))
                run_one("image_size", f"{s}px", tuple(cfg.layers), cfg.patch_size, c)
                del c

    # -------------------------------------------------------------- figures
    def plot_figures(self, cache: _SizeCache) -> list[Path]:
        out = []
        methods = ["SPADE", "PaDiM", *[ratio_label(r) for r in self.cfg.coreset_ratios]]
        curves = {m: self.kept_scores[m] for m in methods if m in self.kept_scores}
        if curves:
            out.append(plot_roc_pr_methods(self.labels, curves, self.figures_dir / f"{self.category}_roc_pr.png",
                                           title=f"{self.category}: image-level ROC and PR (fig. S3 style)"))
        heat = ["SPADE", "PaDiM", ratio_label(self.cfg.heatmap_ratio)]
        heat = [m for m in heat if m in self.kept_maps]
        if heat:
            cases = _heatmap_cases(self.listing.test, self.cfg.heatmap_rows)
            captions = [f"{self.listing.test[i].defect_type} #{i}" for i in cases]
            out.append(plot_heatmap_grid(
                cache.test_images[cases].numpy(), cache.masks[cases], {m: self.kept_maps[m] for m in heat},
                cases, captions, self.figures_dir / f"{self.category}_heatmaps.png",
                title=f"{self.category}: anomaly maps (colour scale per method: its test-set range)",
            ))
        return out


def grid_of(model) -> str:
    h, w = model.feature_grid_
    return f"{h}x{w}"


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def _fmt_load(load: Any) -> str:
    if not load or None in load:
        return "n/a"
    return f"{load[0]:.1f} → {load[1]:.1f}"


def _coreset_size(ratio: float, n: int) -> int:
    """Rows a greedy coreset of `ratio` keeps: int(N·ratio), at least 1 (as `GreedyCoresetSampler`)."""
    return max(1, int(n * ratio))


def _map_batches(maps: dict[str, torch.Tensor], batch_size: int):
    n = len(next(iter(maps.values())))
    for start in range(0, n, batch_size):
        yield {layer: m[start : start + batch_size] for layer, m in maps.items()}


def _state_mb(model) -> float:
    if isinstance(model, PaDiM):
        arrays = [model.mean_, model.inv_covariance_]
    elif isinstance(model, SPADE):
        arrays = [model.train_embeddings_, *model.gallery_.values()]
    else:
        arrays = [model.memory_bank_]
    return sum(a.nbytes for a in arrays) / 2**20


def _levels_key(levels: Sequence[int]) -> str:
    return "(" + ",".join(str(i) for i in levels) + (",)" if len(levels) == 1 else ")")


def _heatmap_cases(test_samples, rows: int) -> list[int]:
    """The first image of each defect type (up to rows − 1 types), then the first good image."""
    first: dict[str, int] = {}
    for i, s in enumerate(test_samples):
        first.setdefault(s.defect_type, i)
    good = first.pop("good", None)
    cases = list(first.values())[: max(1, rows - 1)]
    if good is not None:
        cases.append(good)
    return cases


# ------------------------------------------------------------------------------------------------------------
# figures (matplotlib Figure objects, no pyplot; PNGs palette-quantised to stay small)


def _save_small_png(fig, path: Path, max_bytes: int = 190_000, dpi: int = 80) -> Path:
    """Render `fig`, quantise to 256 colours and save; shrink until the PNG is under `max_bytes`."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    canvas = FigureCanvasAgg(fig)
    fig.set_dpi(dpi)
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3])
    scale = 1.0
    while True:
        im = image if scale == 1.0 else image.resize(
            (max(1, int(image.width * scale)), max(1, int(image.height * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
        if buf.tell() <= max_bytes or scale < 0.3:
            break
        scale *= 0.85
    with atomic_write(path) as tmp:
        tmp.write_bytes(buf.getvalue())
    return path


def plot_roc_pr_methods(labels: np.ndarray, scores: dict[str, np.ndarray], path: str | os.PathLike,
                        title: str = "") -> Path:
    """Image-level ROC (left) and precision-recall (right) curves of several methods in one PNG."""
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

    from patchcore_core.metrics import error_at_full_recall, f1_optimal_threshold

    labels = np.asarray(labels).astype(int)
    fig = Figure(figsize=(10, 4.2))
    ax_roc, ax_pr = fig.subplots(1, 2)
    for name, s in scores.items():
        fpr, tpr, _ = roc_curve(labels, s)
        precision, recall, _ = precision_recall_curve(labels, s)
        f1 = f1_optimal_threshold(labels, s)
        full = error_at_full_recall(labels, s)
        (line,) = ax_roc.plot(fpr, tpr, lw=1.6, label=f"{name}: AUROC {100 * roc_auc_score(labels, s):.1f}")
        ax_pr.plot(recall, precision, lw=1.6, color=line.get_color(), drawstyle="steps-post",
                   label=f"{name}: F1-opt. errors {f1['misclassified']}, "
                         f"FPR@100% recall {full['false_positive_rate']:.2f}")
        ax_pr.plot([f1["recall"]], [f1["precision"]], "o", ms=4, color=line.get_color())
    ax_roc.plot([0, 1], [0, 1], ls="--", lw=0.8, color="grey")
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.02))
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (dot: F1-optimal)", xlim=(0, 1.02),
              ylim=(0, 1.02))
    ax_roc.legend(loc="lower right", fontsize=7)
    ax_pr.legend(loc="lower left", fontsize=6.5)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save_small_png(fig, Path(path))


def plot_heatmap_grid(images: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray], cases: list[int],
                      captions: list[str], path: str | os.PathLike, title: str = "") -> Path:
    """Rows = test cases; columns = the image (ground truth outlined) and each method's heatmap overlay.

    `images` [n,3,S,S] in [0,1] and `masks` [n,S,S] are the selected cases; `maps[method]` holds the
    method's maps for the whole test split ([N,S,S]) so each method gets one colour scale (its test range).
    """
    from matplotlib.figure import Figure

    n, cols = len(cases), 1 + len(maps)
    fig = Figure(figsize=(1.55 * cols, 1.6 * n + 0.4))
    axes = np.atleast_2d(fig.subplots(n, cols))
    scales = {m: (float(v.min()), float(np.percentile(v, 99.9))) for m, v in maps.items()}
    for r, idx in enumerate(cases):
        img = np.moveaxis(np.clip(images[r], 0, 1), 0, -1)
        ax = axes[r, 0]
        ax.imshow(img)
        if masks[r].any():
            ax.contour(masks[r], levels=[0.5], colors="lime", linewidths=0.7)
        ax.set_ylabel(captions[r], fontsize=7)
        for c, (name, m) in enumerate(maps.items(), start=1):
            vmin, vmax = scales[name]
            axes[r, c].imshow(img)
            axes[r, c].imshow(m[idx], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
            if masks[r].any():
                axes[r, c].contour(masks[r], levels=[0.5], colors="white", linewidths=0.5)
            if r == 0:
                axes[r, c].set_title(name, fontsize=8)
        if r == 0:
            axes[r, 0].set_title("image / GT", fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    return _save_small_png(fig, Path(path))


# ------------------------------------------------------------------------------------------------------------
# tables and Markdown


def _pct(v: Any, digits: int = 2) -> str:
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.{digits}f}"


def _num(v: Any, fmt: str = "{:.4f}") -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return fmt.format(v) if isinstance(v, float | np.floating) else str(v)


def _paper(metric: str, method: str, key: str) -> str:
    v = PAPER.get(metric, {}).get(method, {}).get(key)
    return "–" if v is None else f"{v:g}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _select(df: pd.DataFrame, **eq: Any) -> pd.DataFrame:
    mask = np.ones(len(df), dtype=bool)
    for k, v in eq.items():
        if k not in df:
            return df.iloc[0:0]
        mask &= (df[k] == v).to_numpy()
    return df[mask]


def build_tables(rows: list[dict[str, Any]], cfg: ReportConfig) -> dict[str, pd.DataFrame]:
    """The report's tables as DataFrames (metrics as fractions, times in seconds)."""
    df = pd.DataFrame(rows)
    tables: dict[str, pd.DataFrame] = {"all_results": df}
    if df.empty:
        return tables
    methods = ["SPADE", "PaDiM", *[ratio_label(r) for r in cfg.coreset_ratios]]
    main = _select(df, experiment="main")
    for metric in ("image_auroc", "pixel_auroc", "au_pro", "misclassified", "error_at_full_recall"):
        if main.empty:
            break
        pivot = main.pivot_table(index="category", columns="method", values=metric, aggfunc="first")
        pivot = pivot[[m for m in methods if m in pivot.columns]].reset_index()
        tables[metric] = pivot
    for exp in ("subsampling", "search", "reweighting", "patch_size", "layers", "image_size", "lowshot",
                "spade_layers", "timing"):
        part = _select(df, experiment=exp)
        if exp == "subsampling":
            part = pd.concat([_select(df, experiment="main", setting="greedy"), part])
        if not part.empty:
            tables[exp] = part.dropna(axis=1, how="all").reset_index(drop=True)
    return tables


def _mean_row(df: pd.DataFrame, cols: list[str]) -> dict[str, float]:
    return {c: float(df[c].mean()) for c in cols if c in df and df[c].notna().any()}


def build_markdown(rows: list[dict[str, Any]], cfg: ReportConfig, meta: dict[str, Any],
                   figures: list[Path], report_dir: Path) -> tuple[str, dict[str, bool]]:
    df = pd.DataFrame(rows)
    cats = list(dict.fromkeys(df["category"])) if not df.empty else []
    methods = ["SPADE", "PaDiM", *[ratio_label(r) for r in cfg.coreset_ratios]]
    out: list[str] = []
    add = out.append
    pc_layers = ", ".join(hierarchy_layers(cfg.backbone)[i] for i in cfg.layers)
    add("# PatchCore vs SPADE vs PaDiM: paper-style report")
    add("")
    add(f"Generated by `bench/paper_report.py` (`patchcore_core.report.run_paper_report`, patchcore_core "
        f"{__version__}) on {meta['date']}.")
    add("")
    add(md_table(["setting", "value"], [
        ["data", f"`{meta['data']}`"], ["categories", ", ".join(cats)],
        ["backbone", f"{cfg.backbone} (ImageNet weights)"],
        ["image size", f"resize {cfg.resize}, centre crop {cfg.image_size}"],
        ["PatchCore", f"hierarchies {_levels_key(cfg.layers)} = {pc_layers}, P = {cfg.patch_size}, greedy coreset "
                      "(JL projection to 128), exact L2 (faiss Flat), k = 1"],
        ["SPADE", f"K = {cfg.spade_k} images, pyramid levels (1,2,3), global pool of level 4"],
        ["PaDiM", "levels (1,2,3) on the level-1 grid, random channel subset, ε = 0.01"],
        ["device", meta["device"]],
        ["torch / faiss", f"{torch.__version__} / {meta['faiss']}; OMP_WAIT_POLICY={meta.get('omp_wait_policy')}"],
        ["wall time", f"{meta['wall_seconds']:.0f} s ({meta['wall_seconds'] / 60:.1f} min) for the whole grid; "
                      f"process CPU time {meta.get('cpu_seconds', float('nan')):.0f} s; {meta.get('cores', '?')} "
                      f"cores, load average {_fmt_load(meta.get('load'))} (start → end; other jobs share the machine "
                      "when it exceeds the core count, and all times here grow with it)"],
    ]))
    add("")
    add(f"Published numbers (\"paper\") are the PatchCore paper's (WideResNet-50, 224 px, GPU) and, for the SPADE "
        f"pyramid ablation, the SPADE paper's. They are printed wherever the method, metric and category match; "
        f"the backbone differs here ({cfg.backbone}), so they are a reference, not a like-for-like comparison. "
        f"All metrics in %; \"ours / paper\".")
    add("")

    acceptance: dict[str, bool] = {}
    main = _select(df, experiment="main") if not df.empty else df

    def cell(metric: str, method: str, cat: str, value: Any) -> str:
        return f"{_pct(value)} / {_paper(metric, method, cat)}"

    for title, metric in (("1. Image-level anomaly detection: image AUROC (Table 1 / S1)", "image_auroc"),
                          ("2a. Segmentation: pixel AUROC (Table 2 / S2)", "pixel_auroc"),
                          ("2b. Segmentation: AU-PRO, FPR ≤ 0.3 (Table S3)", "au_pro")):
        if main.empty:
            break
        add(f"## {title}")
        add("")
        body = []
        for cat in cats:
            body.append([cat] + [cell(metric, m, cat, _first(main, cat, m, metric)) for m in methods])
        if len(cats) > 1:
            body.append(["**mean**"] + [cell(metric, m, _paper_key(cats), _mean(main, m, metric)) for m in methods])
        add(md_table(["category", *methods], body))
        add("")
        if metric == "image_auroc":
            add("Misclassified test images at the F1-optimal threshold (Table 1's count; the paper gives only the "
                "total over its 15 categories) and the false-positive rate at 100% recall (fig. S3):")
            add("")
            body = [[cat] + [f"{_num(_first(main, cat, m, 'misclassified'), '{:.0f}')} / "
                             f"{_num(_first(main, cat, m, 'error_at_full_recall'), '{:.2f}')}" for m in methods]
                    for cat in cats]
            if len(cats) > 1:
                body.append(["**total / mean**"] + [
                    f"{int(_select(main, method=m)['misclassified'].sum())} "
                    f"(paper {_paper('misclassified', m, _paper_key(cats, 'total'))}) / "
                    f"{_num(_mean(main, m, 'error_at_full_recall'), '{:.2f}')}" for m in methods])
            add(md_table(["category", *methods], body))
            add("")
            for cat in cats:
                pc = [_first(main, cat, ratio_label(r), "image_auroc") for r in cfg.coreset_ratios]
                base_scores = [_first(main, cat, m, "image_auroc") for m in ("SPADE", "PaDiM")]
                if None in pc or None in base_scores:
                    continue
                acceptance[cat] = bool(min(pc) >= max(base_scores))

    if acceptance:
        add("**Check (issue #4):** PatchCore's image AUROC ≥ PaDiM's and ≥ SPADE's at every coreset ratio: "
            + ", ".join(f"{c}: {'yes' if ok else '**no**'}" for c, ok in acceptance.items()) + ".")
        add("")

    sub = _select(df, experiment="subsampling") if not df.empty else df
    if not sub.empty:
        add("## 3. Greedy coreset vs random subsampling (§4.4.2)")
        add("")
        body = []
        for ratio in cfg.coreset_ratios:
            label = ratio_label(ratio)
            g = _select(main, method=label)
            r = _select(sub, method=label)
            body.append([label, _num(_mean_of(g, "bank_size"), "{:.0f}"),
                         *[_pct(_mean_of(g, k)) for k in ("image_auroc", "pixel_auroc", "au_pro")],
                         *[_pct(_mean_of(r, k)) for k in ("image_auroc", "pixel_auroc", "au_pro")]])
        add(md_table(["ratio", "bank", "greedy image", "greedy pixel", "greedy PRO", "random image",
                      "random pixel", "random PRO"], body))
        sel = _mean_of(_select(main, method=ratio_label(cfg.coreset_ratios[0])), "selection_seconds")
        add("")
        add(f"Greedy selection time: {_num(sel, '{:.1f}')} s per category for all ratios together (the smaller "
            "coresets are prefixes of the largest when the sampler returns points in selection order).")
        add("")

    search = _select(df, experiment="search") if not df.empty else df
    if not search.empty:
        add("## 4. Exact vs approximate nearest-neighbour search, PatchCore-100% (§4.3)")
        add("")
        body = [[kind, _num(_mean_of(s, "bank_size"), "{:.0f}"),
                 *[_pct(_mean_of(s, k)) for k in ("image_auroc", "pixel_auroc", "au_pro")],
                 _num(_mean_of(s, "index_seconds"), "{:.1f}"), _num(_mean_of(s, "score_seconds_per_image"))]
                for kind in ("flat", "ivfpq") if not (s := _select(search, setting=kind)).empty]
        add(md_table(["search", "bank", "image AUROC", "pixel AUROC", "AU-PRO", "index build s",
                      "search + maps s/img"], body))
        add("")

    timing = _select(df, experiment="timing") if not df.empty else df
    if not timing.empty:
        add(f"## 5. Inference time per image (Table 5), {meta['device']}")
        add("")
        add(f"`predict` on {int(timing['timing_images'].iloc[0])} preprocessed test images (decoding excluded; "
            "backbone forward, search, upsampling and blur included), after one warm-up image; mean over categories.")
        add("")
        body = []
        for name in dict.fromkeys(timing["method"]):
            t = _select(timing, method=name)
            body.append([name, t["setting"].iloc[0], _num(_mean_of(t, "seconds_per_image")),
                         _num(_mean_of(t, "backbone_seconds_per_image")),
                         _paper("seconds_per_image", name, "gpu")])
        add(md_table(["method", "memory", "s/img (ours)", "of which backbone", "paper s/img (GPU, WRN-50)"], body))
        add("")

    rw = _select(df, experiment="reweighting") if not df.empty else df
    if not rw.empty:
        add("## 6. Ablations")
        add("")
        add("### 6.1 Image-score reweighting, paper eq. 7")
        add("")
        body = [[m, s, _pct(_mean_of(part, "image_auroc")), _num(_mean_of(part, "misclassified"), "{:g}")]
                for (m, s), part in rw.groupby(["method", "setting"], sort=False)]
        add(md_table(["method", "setting", "image AUROC", "misclassified (F1-opt.)"], body))
        add("")
    else:
        add("## 6. Ablations")
        add("")

    label = ratio_label(cfg.ablation_ratio)
    for exp, title, paper_fn in (
        ("patch_size", f"6.2 Patch neighbourhood P ({label}; paper fig. 4 / S4)", None),
        ("layers", f"6.3 Feature hierarchies ({label}; levels 1–3 = "
                   f"{', '.join(hierarchy_layers(cfg.backbone)[i] for i in (1, 2, 3))})", _s4_layers),
        ("image_size", f"6.4 Image size ({label}, hierarchies {_levels_key(cfg.layers)})", _s4_size),
    ):
        part = _select(df, experiment=exp) if not df.empty else df
        if part.empty:
            continue
        add(f"### {title}")
        add("")
        body = []
        for setting, p in part.groupby("setting", sort=False):
            paper = paper_fn(setting, cats) if paper_fn else "–"
            body.append([setting, p["grid"].iloc[0], _num(_mean_of(p, "bank_size"), "{:.0f}"),
                         *[_pct(_mean_of(p, k)) for k in ("image_auroc", "pixel_auroc", "au_pro")],
                         _num(_mean_of(p, "score_seconds_per_image")), paper])
        add(md_table(["setting", "grid", "bank", "image AUROC", "pixel AUROC", "AU-PRO", "search + maps s/img",
                      "paper (Table S4: WRN-101, 280 px, 1%)"], body))
        add("")

    low = _select(df, experiment="lowshot") if not df.empty else df
    if not low.empty:
        add(f"### 6.5 Low-shot: n nominal training images (random subset, seed {cfg.seed}; §4.5)")
        add("")
        settings = list(dict.fromkeys(low["setting"]))
        lmethods = list(dict.fromkeys(low["method"]))
        body = []
        for s in settings:
            row = [s]
            for m in lmethods:
                p = _select(low, setting=s, method=m)
                row.append(" / ".join(_pct(_mean_of(p, k), 1) for k in ("image_auroc", "pixel_auroc", "au_pro")))
            body.append(row)
        add(md_table(["train images", *[f"{m} (image / pixel / PRO)" for m in lmethods]], body))
        add("")

    sp = _select(df, experiment="spade_layers") if not df.empty else df
    if not sp.empty:
        add("### 6.6 SPADE pyramid levels (SPADE paper Table 6, PRO)")
        add("")
        body = []
        for setting, p in sp.groupby("setting", sort=False):
            paper_key = _paper_key(cats)
            paper = PAPER["spade_pro"].get(setting, {}).get(paper_key)
            body.append([setting, p["layers"].iloc[0], p["grids"].iloc[0], _pct(_mean_of(p, "image_auroc")),
                         _pct(_mean_of(p, "pixel_auroc")), _pct(_mean_of(p, "au_pro")),
                         "–" if paper is None else f"{paper:g}"])
        add(md_table(["levels", "layers", "grid(s)", "image AUROC", "pixel AUROC", "AU-PRO", "paper PRO"], body))
        add("")

    if figures:
        add("## Figures")
        add("")
        for path in figures:
            rel = os.path.relpath(path, report_dir)
            add(f"![{path.stem}]({rel})")
            add("")
    return "\n".join(out).rstrip() + "\n", acceptance


def _paper_key(cats: list[str], mean_key: str = "mean") -> str:
    """The published column to compare with: the category itself, or the paper's mean (or total) over its
    15 categories only when this run covers all of them (a mean over fewer categories is another setting)."""
    if len(cats) == 1:
        return cats[0]
    return mean_key if set(PAPER_CATEGORIES) <= set(cats) else "(no match)"


def _first(df: pd.DataFrame, cat: str, method: str, metric: str) -> Any:
    part = _select(df, category=cat, method=method)
    if part.empty or metric not in part or part[metric].isna().all():
        return None
    return part[metric].iloc[0]


def _mean(df: pd.DataFrame, method: str, metric: str) -> Any:
    return _mean_of(_select(df, method=method), metric)


def _mean_of(df: pd.DataFrame, metric: str) -> Any:
    if df.empty or metric not in df or df[metric].isna().all():
        return None
    return float(df[metric].mean())


def _s4_layers(setting: str, cats: list[str]) -> str:
    return _s4(f"s4{setting}", cats)


def _s4_size(setting: str, cats: list[str]) -> str:
    return _s4("s4(2,3)", cats) if setting == "280px" else "–"


def _s4(key: str, cats: list[str]) -> str:
    table = PAPER.get(key)
    if table is None:
        return "–"
    cat = _paper_key(cats)
    vals = [table[m].get(cat) for m in ("image_auroc", "pixel_auroc", "au_pro")]
    return "–" if None in vals else " / ".join(f"{v:g}" for v in vals)


# ------------------------------------------------------------------------------------------------------------
# entry point


def run_paper_report(
    data: str,
    categories: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "bench/results",
    report_name: str = "paper_report.md",
    figures_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    config: ReportConfig | None = None,
    say: Callable[[str], None] | None = None,
    **overrides: Any,
) -> ReportResult:
    """Run the experiment grid on `categories` of the MVTec-layout dataset `data` and write the report.

    Writes `<out_dir>/<report_name>` and PNG figures under `figures_dir` (default
    `<out_dir>/<report stem>_figures`). `config` (a ReportConfig) or keyword overrides of its fields set the
    grid. Returns a ReportResult (Markdown text, paths, tables as DataFrames, raw rows, wall time, device).
    """
    from patchcore_core.data import list_categories, list_category

    cfg = config or ReportConfig()
    if overrides:
        known = {f.name for f in fields(ReportConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown report setting(s) {unknown}; known: {sorted(known)}")
        cfg = ReportConfig(**{**asdict(cfg), **overrides})
    say = say or log.info
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), _loadavg()
    threads = configure_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    out_dir = Path(out_dir)
    report_path = out_dir / report_name
    figures_dir = Path(figures_dir) if figures_dir is not None else out_dir / f"{Path(report_name).stem}_figures"
    cats = list(categories) if categories else list_categories(data, storage_options=storage_options)
    if not cats:
        raise ValueError(f"{data} holds no MVTec-layout category")

    rows: list[dict[str, Any]] = []
    figures: list[Path] = []
    for cat in cats:
        listing = list_category(data, cat, storage_options=storage_options)
        runner = _Runner(cfg, listing, storage_options, device, figures_dir, say)
        runner.run()
        rows += runner.rows
        figures += runner.figures
        del runner

    import faiss

    wall = time.perf_counter() - start
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "data": str(data), "device": device_name(device, threads),
            "faiss": getattr(faiss, "__version__", "?"), "wall_seconds": wall,
            "cpu_seconds": time.process_time() - cpu_start, "load": (load_start, _loadavg()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    markdown, acceptance = build_markdown(rows, cfg, meta, figures, report_path.parent)
    with atomic_write(report_path) as tmp:
        tmp.write_text(markdown)
    results = {"config": asdict(cfg), "meta": meta, "figures": [str(p) for p in figures], "rows": rows}
    with atomic_write(report_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(_jsonable(results), indent=1))
    say(f"report written to {report_path} ({wall:.0f}s)")
    return ReportResult(markdown, report_path, figures, build_tables(rows, cfg), rows, wall, meta["device"],
                        acceptance)


def rebuild_report(results_json: str | os.PathLike, report_path: str | os.PathLike | None = None) -> ReportResult:
    """Re-render the Markdown from the `<report>.json` a run wrote (no recomputation), e.g. after a layout change."""
    results_json = Path(results_json)
    saved = json.loads(results_json.read_text())
    cfg_fields = {f.name: f for f in fields(ReportConfig)}
    raw = {k: v for k, v in saved["config"].items() if k in cfg_fields}
    for key in ("coreset_ratios", "lowshot_sizes", "patch_sizes", "image_sizes", "layers", "experiments"):
        if key in raw:
            raw[key] = tuple(raw[key])
    for key in ("layer_sets", "spade_layer_sets"):
        if key in raw:
            raw[key] = tuple(tuple(x) for x in raw[key])
    cfg = ReportConfig(**raw)
    report_path = Path(report_path) if report_path else results_json.with_suffix(".md")
    figures = [Path(p) for p in saved["figures"]]
    markdown, acceptance = build_markdown(saved["rows"], cfg, saved["meta"], figures, report_path.parent)
    with atomic_write(report_path) as tmp:
        tmp.write_text(markdown)
    return ReportResult(markdown, report_path, figures, build_tables(saved["rows"], cfg), saved["rows"],
                        saved["meta"]["wall_seconds"], saved["meta"]["device"], acceptance)


def _jsonable(value: Any) -> Any:
    """numpy scalars and tuples → plain JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value
