"""The experiment runner: `run_paper_report` runs the grid of the PatchCore paper's tables (1/S1, 2/S2/S3, 5,
§4.3, §4.4.2, the ablations) on one or more categories and writes the report; `rebuild_report` re-renders a
saved run.

Features are computed once and reused: the backbone runs once per (category, image size) over the train and
test images, keeping the raw layer maps (`PatchCore.layer_maps`); every PatchCore setting (layers, patch size)
is aggregated from them (`PatchCore.aggregate`), and its train/test patch features are computed once and shared
by the coreset ratios, random-vs-greedy, Flat-vs-IVFPQ and reweighting variants. A variant is
`sklearn.base.clone(base).set_params(...)` and only uses `fit_memory_bank` / `fit_features` / `score_features`,
which need no backbone. SPADE and PaDiM fit from the same layer maps (`fit_features` / `score_features`).
Greedy coresets of several ratios are prefixes of one greedy run when the sampler returns points in selection
order (the k-center greedy is incremental). Inference times are measured separately, end to end (`predict` on
preprocessed images: backbone, search, upsampling and blur), on `timing_images` test images after one warm-up.

Every detector setting comes from the config's validated `DetectorParams` (`ReportConfig.params`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import clone

from experiments.paper_report.common import (
    ReportConfig,
    ReportResult,
    clock,
    device_name,
    levels_key,
    loadavg,
    ratio_label,
)
from experiments.paper_report.figures import heatmap_cases, plot_heatmap_grid, plot_roc_pr_methods
from experiments.paper_report.markdown import build_markdown, build_tables
from patchcore_core.artifacts import atomic_write
from patchcore_core.baselines import SPADE, PaDiM, make_detector
from patchcore_core.metrics import compute_metrics
from patchcore_core.runtime import configure_threads, resolve_device

log = logging.getLogger(__name__)

__all__ = ["run_paper_report", "rebuild_report"]


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


def variant(model, **changes):
    """An unfitted copy of `model`'s settings with `changes` (sklearn's clone + set_params)."""
    return clone(model).set_params(**changes)


class _Runner:
    """Runs the grid for one category and collects result rows."""

    def __init__(self, cfg: ReportConfig, listing, storage_options: dict | None, device: torch.device,
                 figures_dir: Path, say: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.params = cfg.params
        self.listing = listing
        self.category = listing.category
        self.storage_options = storage_options
        self.device = device
        self.figures_dir = figures_dir
        self.say = say
        self.levels = cfg.hierarchy
        self.labels = np.array([s.label for s in listing.test], dtype=np.int64)
        self.rows: list[dict[str, Any]] = []
        self.figures: list[Path] = []
        self.kept_maps: dict[str, np.ndarray] = {}
        self.kept_scores: dict[str, np.ndarray] = {}
        self._backbones: dict[tuple[str, ...], Any] = {}
        self._default_ablation: tuple | None = None

    # -------------------------------------------------------------- detectors
    def detector(self, method: str, size: int, resize: int | None, **changes: Any):
        """An unfitted PatchCore / SPADE / PaDiM with the config's detector settings at this image size.

        `layers` in the settings are PatchCore's; SPADE and PaDiM keep their own defaults (levels 1-3) unless
        `changes` names theirs.
        """
        kwargs = self.params.estimator_params()
        if method != "patchcore":
            kwargs.pop("layers")
        kwargs.update(resize=resize, image_size=size, device=str(self.device), progress=self.cfg.progress)
        kwargs.update(changes)
        return make_detector(method, strict=False, **kwargs)

    # -------------------------------------------------------------- features
    def _backbone(self, layers: tuple[str, ...]):
        """A PatchCore used only for `layer_maps` of `layers` (one frozen backbone per layer set)."""
        if layers not in self._backbones:
            self._backbones[layers] = self.detector("patchcore", self.params.image_size, self.params.resize,
                                                    layers=list(layers))
        return self._backbones[layers]

    def _layer_maps(self, paths: list[str], size: int, resize: int | None, layers: tuple[str, ...],
                    keep_images: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, float]:
        from patchcore_core.data import load_images

        backbone = self._backbone(layers)
        batch_size = self.params.batch_size
        parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
        images, seconds = [], 0.0
        for start in range(0, len(paths), batch_size):
            batch = load_images(paths[start : start + batch_size], resize=resize, image_size=size,
                                storage_options=self.storage_options, num_workers=2)
            t0 = clock(self.device)
            out = backbone.layer_maps(batch.to(self.device))
            seconds += clock(self.device) - t0
            for layer in layers:
                parts[layer].append(out[layer].float().cpu())
            if keep_images:
                images.append(batch)
        maps = {layer: torch.cat(p) for layer, p in parts.items()}
        return maps, (torch.cat(images) if keep_images else None), seconds

    def size_cache(self, size: int, layers: tuple[str, ...]) -> _SizeCache:
        from patchcore_core.data import load_masks

        resize = self.cfg.resize_for(size)
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
        """The PatchCore of one feature setting: aggregates patch features, and is the template of its variants."""
        return self.detector("patchcore", size, resize, layers=list(layers), patch_size=patch_size)

    def patch_features(self, base, maps: dict[str, torch.Tensor]) -> tuple[np.ndarray, tuple[int, int]]:
        """PatchCore patch features [N, h*w, D] from cached layer maps (`base.aggregate`, as `PatchCore.embed`)."""
        layers = list(base.layers)
        n = len(maps[layers[0]])
        batch_size = self.params.batch_size
        out, grid = None, None
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            feats, grid = base.aggregate({layer: maps[layer][sl].to(self.device) for layer in layers})
            feats = feats.float().cpu().numpy()
            if out is None:
                out = np.empty((n, feats.shape[1], feats.shape[2]), dtype=np.float32)
            out[sl] = feats
        return out, tuple(grid)

    def score_patchcore(self, model, test_feats: np.ndarray, size: int,
                        with_worst: bool = False) -> tuple[np.ndarray, np.ndarray, float] | tuple:
        """Image scores, maps and search + map seconds per image; with `with_worst`, also each image's most
        anomalous patch feature [N, D] (the argmax patch that the image score and eq. 7 are taken at)."""
        from patchcore_core.scoring import anomaly_maps, score_stream

        worst = []

        def score(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            s, grids = model.score_features(feats)
            if with_worst:
                worst.append(feats[np.arange(len(feats)), grids.reshape(len(feats), -1).argmax(axis=1)])
            return s, anomaly_maps(grids, size)

        batch_size = self.params.batch_size
        batches = ((None, test_feats[s : s + batch_size]) for s in range(0, len(test_feats), batch_size))
        t0 = clock(self.device)
        scores, maps = score_stream(batches, score, len(test_feats), size)
        seconds = (clock(self.device) - t0) / max(1, len(test_feats))
        out = (scores, maps, seconds)
        return (*out, np.concatenate(worst)) if with_worst else out

    def reweighted_scores(self, model, worst_feats: np.ndarray) -> np.ndarray:
        """Eq. 7 image scores of `model`'s bank, searching only each image's most anomalous patch.

        The image score is taken at the argmax patch, so scoring that one patch per image (the same bank
        fitted with a 1x1 grid) gives the same reweighted score as `score_features` on all patches, at 1/(h*w)
        of the search.
        """
        rw = variant(model, reweight_neighbors=self.cfg.reweight_neighbors)
        rw.fit_memory_bank(model.memory_bank_, (1, 1), n_train_patches=model.n_train_patches_)
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
            s = sampler_module.make_sampler("greedy", ratio, projection_dim=self.params.projection_dim,
                                            seed=self.params.seed, device=str(self.device),
                                            progress=self.cfg.progress)
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
        size = self.params.image_size
        cache = self.size_cache(size, base_layers)

        # ---- PatchCore main features, shared by every variant at the default setting
        base = self.patchcore_base(cfg.layer_names, self.params.patch_size, size, cache.resize)
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
            model = variant(base, coreset_ratio=ratio, coreset_method="greedy")
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
                rw_scores = self.reweighted_scores(model, worst)
                self.record("reweighting", label, f"eq. 7 on (b = {cfg.reweight_neighbors})", rw_scores, None, None)
                self.record("reweighting", label, "eq. 7 off", scores, None, None)
            del maps

        if "subsampling" in exps:
            for ratio in ratios:
                model = variant(base, coreset_ratio=ratio, coreset_method="random")
                t0 = time.perf_counter()
                model.fit_features(bank, grid)
                fit_s = time.perf_counter() - t0
                scores, maps, sec = self.score_patchcore(model, test_feats, size)
                self.record("subsampling", ratio_label(ratio), "random", scores, maps, cache.masks,
                            bank_size=len(model.memory_bank_), score_seconds_per_image=sec, selection_seconds=fit_s)
                del maps

        if want_ablation_ratio:  # the ablations' default setting, from the main features
            model = variant(base, coreset_ratio=cfg.ablation_ratio, coreset_method="greedy")
            model.fit_memory_bank(bank[selections[cfg.ablation_ratio]], grid, n_train_patches=n_patches)
            scores, maps, sec = self.score_patchcore(model, test_feats, size)
            self._default_ablation = (scores, maps, sec, len(model.memory_bank_), grid_of(model))
            del model

        if exps & {"search", "timing"}:
            for kind in ("flat", "ivfpq"):
                model = variant(base, coreset_ratio=1.0, coreset_method="none", index=kind)
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
        spade = self.detector("spade", size, cache.resize)
        padim = self.detector("padim", size, cache.resize)
        for name, model in (("SPADE", spade), ("PaDiM", padim)):
            t0 = time.perf_counter()
            model.fit_features(_map_batches(cache.train, self.params.batch_size))
            fit_s = time.perf_counter() - t0
            scores, maps, sec = self.score_baseline(model, cache.test)
            setting = (f"K = {model.k_images}, layers {', '.join(model.resolved_layers()[0])}" if name == "SPADE"
                       else _padim_setting(model, cache.train))
            self.record("main", name, setting, scores, maps, cache.masks, fit_seconds=fit_s,
                        score_seconds_per_image=sec, state_mb=_state_mb(model))
            self.kept_maps[name], self.kept_scores[name] = maps, scores
            pc_models[name] = model

        if "spade_layers" in exps:
            for levels in cfg.spade_layer_sets:
                layers = [lv[i] for i in levels]
                if layers == spade.resolved_layers()[0]:  # the main SPADE run
                    main_row = next(r for r in self.rows if r["experiment"] == "main" and r["method"] == "SPADE")
                    self.rows.append({**main_row, "experiment": "spade_layers", "setting": levels_key(levels),
                                      "grids": "/".join(str(cache.test[la].shape[-1]) for la in layers),
                                      "layers": ", ".join(layers)})
                    continue
                model = self.detector("spade", size, cache.resize, layers=layers, progress=False)
                model.fit_features(_map_batches(cache.train, self.params.batch_size))
                scores, maps, _ = self.score_baseline(model, cache.test)
                grids = "/".join(str(cache.test[layer].shape[-1]) for layer in layers)
                self.record("spade_layers", "SPADE", levels_key(levels), scores, maps, cache.masks, grids=grids,
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

        if cfg.presets:
            self.presets()

    def presets(self) -> None:
        """The report's base setting (10 % coreset) and each named preset, end to end from image paths.

        Fit seconds cover decoding, the backbone, the coreset and the index; predict seconds per image cover
        decoding, the backbone, the search, the upsampling and the blur (whole test split, one process)."""
        from patchcore_core.config import validate_params
        from patchcore_core.data import load_masks
        from patchcore_core.errors import WeightsUnavailableError

        train = [s.path for s in self.listing.train]
        test = [s.path for s in self.listing.test]
        named = [("base (10 %)", self.params.model_copy(update={"coreset_ratio": 0.1}))]
        named += [(f"preset {n}", validate_params(preset=n)) for n in self.cfg.presets]
        for label, params in named:
            setting = (f"{params.backbone}, layers {','.join(params.layers or ['default'])}, "
                       f"{params.resize}->{params.image_size}px, P={params.patch_size}, "
                       f"dims {params.pretrain_dim or 'default'}/{params.target_dim or 'default'}, "
                       f"{params.coreset_ratio:g} coreset, eq.7 b={params.reweight_neighbors}")
            model = make_detector("patchcore", strict=False, **params.estimator_params(), device=str(self.device),
                                  progress=self.cfg.progress)
            try:
                t0 = clock(self.device)
                model.fit(train)
            except WeightsUnavailableError as exc:
                self.rows.append({"category": self.category, "experiment": "preset", "method": label,
                                  "setting": setting, "not_run": str(exc).split(":")[0]})
                self.say(f"{self.category}: [preset] {label}: not run ({exc})")
                continue
            fit_s = clock(self.device) - t0
            t0 = clock(self.device)
            scores, maps = model.predict(test)
            predict_s = (clock(self.device) - t0) / len(test)
            masks = load_masks(self.listing.test, params.resize, params.image_size, self.storage_options,
                               num_workers=2)
            self.record("preset", label, setting, scores, maps, masks, fit_seconds=fit_s,
                        seconds_per_image=predict_s, bank_size=len(model.memory_bank_))
            del model, maps, masks

    def score_baseline(self, model, test_maps: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, float]:
        scores, maps = [], []
        t0 = clock(self.device)
        for batch in _map_batches(test_maps, self.params.batch_size):
            s, m = model.score_features(batch)
            scores.append(s)
            maps.append(m)
        seconds = (clock(self.device) - t0) / max(1, len(self.labels))
        return np.concatenate(scores), np.concatenate(maps), seconds

    def timing(self, models: dict[str, Any], cache: _SizeCache) -> None:
        """End-to-end seconds per image of `predict` on preprocessed test images (after one warm-up image),
        and of the backbone forward alone (`PatchCore.layer_maps`, the baselines' `iter_layer_maps`)."""
        n = min(self.cfg.timing_images, len(cache.test_images))
        images = cache.test_images[:n]
        batch_size = self.params.batch_size
        order = ["SPADE", "PaDiM", "PatchCore-100%", "PatchCore-100% IVFPQ",
                 *[ratio_label(r) for r in sorted(self.cfg.coreset_ratios, reverse=True)]]
        for name in order:
            model = models.get(name)
            if model is None:
                continue
            model.predict(images[:1])  # warm-up: builds the backbone, first-call allocations
            t0 = clock(self.device)
            model.predict(images)
            seconds = (clock(self.device) - t0) / n
            t0 = clock(self.device)
            if isinstance(model, SPADE | PaDiM):
                for _ in model.iter_layer_maps(images):
                    pass
            else:
                for start in range(0, n, batch_size):
                    model.layer_maps(images[start : start + batch_size].to(self.device))
            backbone = (clock(self.device) - t0) / n
            size = (f"{len(model.memory_bank_)} patches, {_state_mb(model):.1f} MB"
                    if not isinstance(model, SPADE | PaDiM) else f"{_state_mb(model):.1f} MB state")
            row = {"category": self.category, "experiment": "timing", "method": name, "setting": size,
                   "seconds_per_image": seconds, "backbone_seconds_per_image": backbone, "timing_images": n}
            self.rows.append(row)
            self.say(f"{self.category}: [timing] {name}: {seconds:.4f} s/img (backbone {backbone:.4f})")

    def lowshot(self, base, bank: np.ndarray, grid, test_feats: np.ndarray, cache: _SizeCache) -> None:
        cfg = self.cfg
        n_train = len(self.listing.train)
        per_image = grid[0] * grid[1]
        rng = np.random.default_rng(self.params.seed)
        for n in cfg.lowshot_sizes:
            if n > n_train:
                continue
            subset = np.sort(rng.choice(n_train, n, replace=False))
            rows = (subset[:, None] * per_image + np.arange(per_image)[None, :]).reshape(-1)
            model = variant(base, coreset_ratio=cfg.lowshot_ratio, coreset_method="greedy")
            model.fit_features(bank[rows], grid)
            scores, maps, _ = self.score_patchcore(model, test_feats, cache.size)
            self.record("lowshot", ratio_label(cfg.lowshot_ratio), str(n), scores, maps, cache.masks, n_train=n)
            train_maps = {layer: m[torch.from_numpy(subset)] for layer, m in cache.train.items()}
            for method in ("spade", "padim"):
                model = self.detector(method, cache.size, cache.resize, progress=False)
                model.fit_features(_map_batches(train_maps, self.params.batch_size))
                scores, maps, _ = self.score_baseline(model, cache.test)
                self.record("lowshot", model.MODEL_NAME, str(n), scores, maps, cache.masks, n_train=n)
            del maps

    def ablations(self, cache: _SizeCache) -> None:
        """Patch size, layer sets and image size, PatchCore at `ablation_ratio` (greedy, Flat)."""
        cfg = self.cfg
        exps = set(cfg.experiments)
        lv = self.levels
        label = ratio_label(cfg.ablation_ratio)
        default_key = (cfg.levels, self.params.patch_size, self.params.image_size)

        def run_one(experiment: str, setting: str, levels: tuple[int, ...], patch: int, c: _SizeCache) -> None:
            if (tuple(levels), patch, c.size) == default_key:  # computed in run() from the main features
                scores, maps, sec, bank_size, grid = self._default_ablation
            else:
                base = self.patchcore_base([lv[i] for i in levels], patch, c.size, c.resize)
                train_feats, g = self.patch_features(base, c.train)
                bank = train_feats.reshape(-1, train_feats.shape[-1])
                del train_feats
                model = variant(base, coreset_ratio=cfg.ablation_ratio, coreset_method="greedy")
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
                run_one("patch_size", f"P = {p}", cfg.levels, p, cache)
        if "layers" in exps:
            for levels in cfg.layer_sets:
                run_one("layers", levels_key(levels), tuple(levels), self.params.patch_size, cache)
        if "image_size" in exps:
            for s in cfg.image_sizes:
                if s == cache.size:
                    c = cache
                else:
                    c = self.size_cache(s, tuple(lv[i] for i in cfg.levels))
                run_one("image_size", f"{s}px", cfg.levels, self.params.patch_size, c)
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
            cases = heatmap_cases(self.listing.test, self.cfg.heatmap_rows)
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


def _coreset_size(ratio: float, n: int) -> int:
    """Rows a greedy coreset of `ratio` keeps: int(N·ratio), at least 1 (as `GreedyCoresetSampler`)."""
    return max(1, int(n * ratio))


def _map_batches(maps: dict[str, torch.Tensor], batch_size: int):
    n = len(next(iter(maps.values())))
    for start in range(0, n, batch_size):
        yield {layer: m[start : start + batch_size] for layer, m in maps.items()}


def _padim_setting(model: PaDiM, maps: dict[str, torch.Tensor]) -> str:
    """'d = kept of total' channels of a fitted PaDiM (`channel_idx_` indexes the layers' channels)."""
    total = sum(int(maps[layer].shape[1]) for layer in model.resolved_layers())
    return f"d = {len(model.channel_idx_)} of {total}"


def _state_mb(model) -> float:
    if isinstance(model, PaDiM):
        arrays = [model.mean_, model.inv_covariance_]
    elif isinstance(model, SPADE):
        arrays = [model.train_embeddings_, *model.gallery_.values()]
    else:
        arrays = [model.memory_bank_]
    return sum(a.nbytes for a in arrays) / 2**20


def _category_counts(listing) -> dict[str, int]:
    labels = [s.label for s in listing.test]
    return {"train": len(listing.train), "test": len(labels), "test_good": sum(1 for x in labels if x == 0)}


# ------------------------------------------------------------------------------------------------------------
# entry points


def run_paper_report(
    data: str,
    categories: Sequence[str] | None = None,
    out_dir: str | os.PathLike = "bench/results",
    report_name: str = "paper_report.md",
    figures_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    config: ReportConfig | None = None,
    say: Callable[[str], None] | None = None,
    **settings: Any,
) -> ReportResult:
    """Run the experiment grid on `categories` of the MVTec-layout dataset `data` and write the report.

    Writes `<out_dir>/<report_name>`, the raw results `<out_dir>/<report stem>.json` and PNG figures under
    `figures_dir` (default `<out_dir>/<report stem>_figures`). `config` (a ReportConfig) and `settings` set the
    grid: grid settings by name (coreset_ratios, experiments, ...), detector settings by their
    `DetectorParams` name (backbone, resize, image_size, batch_size, k_images, ...; these go into
    `config.base`), anything else raises TypeError. Returns a ReportResult (Markdown text, paths, tables as
    DataFrames, raw rows, wall time, device).
    """
    from patchcore_core.data import list_categories, list_category

    cfg = config or ReportConfig()
    if settings:
        cfg = cfg.updated(**settings)
    say = say or log.info
    start, cpu_start, load_start = time.perf_counter(), time.process_time(), loadavg()
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
    counts: dict[str, dict[str, int]] = {}
    for cat in cats:
        listing = list_category(data, cat, storage_options=storage_options)
        counts[cat] = _category_counts(listing)
        runner = _Runner(cfg, listing, storage_options, device, figures_dir, say)
        runner.run()
        rows += runner.rows
        figures += runner.figures
        del runner

    import faiss

    wall = time.perf_counter() - start
    meta = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "data": str(data), "device": device_name(device, threads),
            "faiss": getattr(faiss, "__version__", "?"), "wall_seconds": wall,
            "cpu_seconds": time.process_time() - cpu_start, "load": (load_start, loadavg()),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "categories": counts}
    markdown, acceptance = build_markdown(rows, cfg, meta, figures, report_path.parent)
    with atomic_write(report_path) as tmp:
        tmp.write_text(markdown)
    results = {"config": cfg.to_dict(), "meta": meta, "figures": [str(p) for p in figures], "rows": rows}
    with atomic_write(report_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(_jsonable(results), indent=1))
    say(f"report written to {report_path} ({wall:.0f}s)")
    return ReportResult(markdown, report_path, figures, build_tables(rows, cfg), rows, wall, meta["device"],
                        acceptance)


def rebuild_report(results_json: str | os.PathLike, report_path: str | os.PathLike | None = None) -> ReportResult:
    """Re-render the Markdown from the `<report>.json` a run wrote (no recomputation), e.g. after a layout change.

    Reads both the current layout (`config.base`) and the older one with detector settings beside the grid's.
    """
    results_json = Path(results_json)
    saved = json.loads(results_json.read_text())
    cfg = ReportConfig.from_dict(saved["config"])
    report_path = Path(report_path) if report_path else results_json.with_suffix(".md")
    figures = [_figure_path(p, results_json.parent) for p in saved["figures"]]
    markdown, acceptance = build_markdown(saved["rows"], cfg, saved["meta"], figures, report_path.parent)
    with atomic_write(report_path) as tmp:
        tmp.write_text(markdown)
    return ReportResult(markdown, report_path, figures, build_tables(saved["rows"], cfg), saved["rows"],
                        saved["meta"]["wall_seconds"], saved["meta"]["device"], acceptance)


def _figure_path(saved: str, results_dir: Path) -> Path:
    """A figure recorded by a run, found again in a moved or cloned tree: relative paths are taken from the
    results folder; an absolute one is looked up first by its last two parts beside the results (the copy
    that travels with them), then where it was written."""
    path = Path(saved)
    if not path.is_absolute():
        return results_dir / path
    beside = results_dir / path.parent.name / path.name
    return beside if beside.exists() else path


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
