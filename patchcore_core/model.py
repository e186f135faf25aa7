"""PatchCore as a scikit-learn estimator: the constructor stores the settings, `fit` learns, `predict` scores.

Like the official code's `PatchCore.load(featuresampler=..., nn_method=...)`, the coreset sampler and the
nearest-neighbour index are injectable (`sampler=`, `nn_index=`); by default they are built from the
`coreset_*` and `index` settings. Every default comes from the one schema, `patchcore_core.config`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from patchcore_core.artifacts import BANK_FILE, INDEX_FILE
from patchcore_core.backbones import FeatureExtractor, get_spec
from patchcore_core.config import DEFAULTS as D
from patchcore_core.errors import DataError, IncompatibleModelError
from patchcore_core.estimator import Detector, Images
from patchcore_core.features import PatchFeatureAggregator
from patchcore_core.index import NearestNeighbourIndex
from patchcore_core.sampler import make_sampler
from patchcore_core.scoring import anomaly_maps, patch_scores, reweight_weights, score_stream

__all__ = ["PatchCore"]


class PatchCore(Detector):
    """PatchCore anomaly detector ("Towards Total Recall in Industrial Anomaly Detection").

    Fitted state: `memory_bank_` [k, D] float32 (the coreset), `index_` (the fitted nearest-neighbour index),
    `feature_grid_` (h, w), `n_train_patches_`. `layers`/`pretrain_dim`/`target_dim` default to the backbone's.
    `sampler`: any object with `select(features [N, D]) -> indices`; `nn_index`: an unfitted
    `NearestNeighbourIndex`-like object (`fit(bank)`, `search(queries, k)`, `save(path)`).
    """

    MODEL_NAME = "PatchCore"
    FITTED_ATTR = "index_"

    def __init__(
        self,
        backbone: str = D.backbone,
        layers: list[str] | None = D.layers,
        weights: str | None = D.weights,
        patch_size: int = D.patch_size,
        pretrain_dim: int | None = D.pretrain_dim,
        target_dim: int | None = D.target_dim,
        coreset_ratio: float = D.coreset_ratio,
        coreset_method: str = D.coreset_method,
        projection_dim: int = D.projection_dim,
        num_neighbors: int = D.num_neighbors,
        reweight_neighbors: int = D.reweight_neighbors,
        distance: str = D.distance,
        calibration_fraction: float = D.calibration_fraction,
        calibration_min_images: int = D.calibration_min_images,
        target_fpr: float = D.target_fpr,
        target_pixel_fpr: float = D.target_pixel_fpr,
        resize: int | None = D.resize,
        image_size: int = D.image_size,
        index: str = D.index,
        seed: int = D.seed,
        batch_size: int = D.batch_size,
        sampler: Any = None,
        nn_index: Any = None,
        device: str = "auto",
        num_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.weights = weights
        self.patch_size = patch_size
        self.pretrain_dim = pretrain_dim
        self.target_dim = target_dim
        self.coreset_ratio = coreset_ratio
        self.coreset_method = coreset_method
        self.projection_dim = projection_dim
        self.num_neighbors = num_neighbors
        self.reweight_neighbors = reweight_neighbors
        self.distance = distance
        self.calibration_fraction = calibration_fraction
        self.calibration_min_images = calibration_min_images
        self.target_fpr = target_fpr
        self.target_pixel_fpr = target_pixel_fpr
        self.resize = resize
        self.image_size = image_size
        self.index = index
        self.seed = seed
        self.batch_size = batch_size
        self.sampler = sampler
        self.nn_index = nn_index
        self.device = device
        self.num_threads = num_threads
        self.progress = progress

    # ----------------------------------------------------------------- features
    def resolved_layers(self) -> list[str]:
        return list(self.layers) if self.layers else list(get_spec(self.backbone).default_layers)

    def _extractor(self) -> FeatureExtractor:
        """The frozen backbone and the aggregator, built once on first use (a loaded model reads no weights
        until it embeds images; the index and scoring stages never do)."""
        if getattr(self, "extractor_", None) is None:
            spec = get_spec(self.backbone)
            self.extractor_ = FeatureExtractor(self.backbone, self.resolved_layers(), self.weights, self._runtime())
            self.aggregator_ = PatchFeatureAggregator(
                self.extractor_.channels, self.patch_size, self.pretrain_dim or spec.default_pretrain_dim,
                self.target_dim or spec.default_target_dim,
            )
        return self.extractor_

    def layer_maps(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Backbone layer maps {layer: [B, C, h, w]} of a preprocessed batch [B,3,S,S] in [0,1]."""
        extractor = self._extractor()
        return extractor(batch.to(self.device_))

    def aggregate(self, layer_maps: dict[str, torch.Tensor]) -> tuple[torch.Tensor, tuple[int, int]]:
        """Locally aware patch features [B, h*w, D] (CPU, float32) and the grid (h, w) from layer maps."""
        self._extractor()
        feats, grid = self.aggregator_([layer_maps[name] for name in self.resolved_layers()])
        return feats.float().cpu(), grid

    def embed(self, batch: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features [B, h*w, D] (CPU, float32) and the grid of one preprocessed batch [B,3,S,S]."""
        return self.aggregate(self.layer_maps(batch))

    def iter_features(self, images: Images, desc: str = "features") -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """Stream per-batch patch features [B, h*w, D] as numpy arrays, for callers that store them."""
        for batch in self.image_batches(images, desc):
            feats, grid = self.embed(batch)
            yield feats.numpy(), grid

    # ----------------------------------------------------------------- fit
    def fit(self, images: Images) -> PatchCore:
        """Extract all nominal patch features, subsample the coreset, and index it."""
        self._prepare(images)
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        bank, grid, row = None, (0, 0), 0
        for feats, batch_grid in self.iter_features(images, desc="fit: features"):
            grid = batch_grid
            if bank is None:  # preallocate once: [n_images * h * w, D]
                bank = np.empty((len(images) * feats.shape[1], feats.shape[2]), dtype=np.float32)
            bank[row : row + feats.shape[0] * feats.shape[1]] = feats.reshape(-1, feats.shape[2])
            row += feats.shape[0] * feats.shape[1]
        return self.fit_features(bank[:row], grid)

    def make_sampler(self):
        """The injected sampler, or the one the `coreset_*` settings describe."""
        if self.sampler is not None:
            return self.sampler
        return make_sampler(self.coreset_method, self.coreset_ratio, projection_dim=self.projection_dim,
                            seed=self.seed, device=str(self._runtime()), progress=self.progress)

    def fit_features(self, bank: np.ndarray, grid: tuple[int, int]) -> PatchCore:
        """Fit from precomputed patch features [N, D] of whole images (e.g. read back from Parquet shards):
        calibrate the thresholds on held-out images, then select the coreset of all of them and index it."""
        self._prepare()
        calibration = self.calibrate(bank, grid)
        selected = self.make_sampler().select(bank)
        self.fit_memory_bank(bank[selected], grid, n_train_patches=len(bank))
        return self.set_calibration(calibration)

    def calibrate(self, bank: np.ndarray, grid: tuple[int, int]) -> dict | None:
        """Thresholds from held-out train images scored against a coreset of the others (None when off).

        `bank` holds whole images in order, h*w rows each; the held-out choice is `calibration.holdout_images`.
        """
        from sklearn.base import clone

        from patchcore_core.calibration import holdout_images, thresholds

        per_image = int(grid[0]) * int(grid[1])
        n_images = len(bank) // per_image
        held = holdout_images(n_images, self.calibration_fraction, self.calibration_min_images, self.seed)
        if len(held) == 0:
            return None
        rows = np.zeros(n_images, dtype=bool)
        rows[held] = True
        rows = np.repeat(rows, per_image)
        helper = clone(self).set_params(calibration_fraction=0.0, progress=False)
        helper.fit_features(bank[~rows], grid)
        feats = bank[rows].reshape(len(held), per_image, -1)
        scores, maps = score_stream(((None, feats[i : i + self.batch_size]) for i in range(0, len(held),
                                     self.batch_size)), helper.score_patch_features, len(held), self.image_size)
        return thresholds(scores, maps, self.target_fpr, self.target_pixel_fpr, n_images - len(held))

    def set_calibration(self, calibration: dict | None) -> PatchCore:
        """Store calibrated thresholds (`threshold_`, `pixel_threshold_`, `calibration_`; None when off)."""
        self.calibration_ = calibration
        self.threshold_ = None if calibration is None else float(calibration["threshold"])
        self.pixel_threshold_ = None if calibration is None else float(calibration["pixel_threshold"])
        return self

    def fit_memory_bank(self, memory_bank: np.ndarray, grid: tuple[int, int], n_train_patches: int) -> PatchCore:
        """Set an already-selected memory bank [k, D] and build its search index (no backbone needed); thresholds
        are cleared (`set_calibration` sets them)."""
        self._prepare()
        self.set_calibration(None)
        self.memory_bank_ = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.feature_grid_ = (int(grid[0]), int(grid[1]))
        self.n_train_patches_ = int(n_train_patches)
        # An injected index is copied before fitting: constructor arguments stay as given (scikit-learn rule).
        index = copy.deepcopy(self.nn_index) if self.nn_index is not None else NearestNeighbourIndex(
            self.index, device=str(self.device_), seed=self.seed)
        self.index_ = index.fit(self.memory_bank_)
        return self

    def extend(self, images: Images | None = None, features: np.ndarray | None = None) -> PatchCore:
        """Add new nominal images to a fitted model without a full retrain (incremental memory bank).

        `images` (paths or a preprocessed tensor, as `fit` takes) are embedded; or give their patch `features`
        ([M, D] or [B, h*w, D], e.g. read back from shards). The greedy coreset is continued: the current bank
        is the already-selected set, the new patches are the candidates (`sampler.continue_select`: same
        seeded JL projection, exact farthest-point steps) and k = int(ratio·M) of them (at least 1) are
        chosen, the rule `fit` uses. A sampler without `continue_select` selects among the new patches alone
        (`random`: a seeded random subset at the ratio; `none`: all of them). The chosen rows are appended
        (the old bank stays a prefix), `n_train_patches_` grows by M, and the index is rebuilt through
        `fit_memory_bank` (so an injected `nn_index` is honoured). The calibrated thresholds are kept: a larger
        bank only lowers nominal scores, so their false-positive rate stays at most the target; refit to
        recalibrate. Returns self.
        """
        self.check_fitted()
        if (images is None) == (features is None):
            raise ValueError("extend takes either images or features, not both and not neither")
        self._prepare(images)
        if images is not None:
            if len(images) == 0:
                raise ValueError("extend needs at least one image")
            parts = []
            for feats, grid in self.iter_features(images, desc="extend: features"):
                if tuple(grid) != tuple(self.feature_grid_):
                    raise DataError(f"extend: the new images give a {grid[0]}x{grid[1]} feature grid, the model was "
                                    f"fitted on {self.feature_grid_[0]}x{self.feature_grid_[1]} (another image size?)")
                parts.append(feats.reshape(-1, feats.shape[2]))
            new = np.concatenate(parts)
        else:
            new = np.asarray(features, dtype=np.float32)
            new = new.reshape(-1, new.shape[-1]) if new.ndim == 3 else new
        if new.ndim != 2 or len(new) == 0 or new.shape[1] != self.memory_bank_.shape[1]:
            raise DataError(f"extend: new patch features must be [M, {self.memory_bank_.shape[1]}] with M >= 1, "
                            f"got shape {tuple(new.shape)}")
        if not np.isfinite(new).all():
            raise DataError("extend: new patch features contain NaN or inf")
        sampler = self.make_sampler()
        if hasattr(sampler, "continue_select"):
            chosen = sampler.continue_select(self.memory_bank_, new)
        else:
            chosen = sampler.select(new)
        bank = np.concatenate([self.memory_bank_, new[np.asarray(chosen, dtype=np.int64)]])
        calibration = self.calibration_
        self.fit_memory_bank(bank, self.feature_grid_, self.n_train_patches_ + len(new))
        return self.set_calibration(calibration)

    # ----------------------------------------------------------------- predict
    def score_features(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and patch-score grids [B, h, w] for patch features [B, h*w, D]."""
        self.check_fitted()
        b, n, d = feats.shape
        k = max(self.num_neighbors, 1)
        sq, ids = self.index_.search(feats.reshape(-1, d), k)
        scores = patch_scores(sq, self.distance).reshape(b, n)
        worst = scores.argmax(axis=1)
        image = scores[np.arange(b), worst]
        if self.reweight_neighbors > 0:
            image = image * self._reweighting(feats[np.arange(b), worst], ids.reshape(b, n, k)[np.arange(b), worst, 0])
        return image.astype(np.float32), scores.reshape(b, *self.feature_grid_)

    def _reweighting(self, worst_feats: np.ndarray, nearest_ids: np.ndarray) -> np.ndarray:
        """Eq. 7 weights from the b nearest bank neighbours of each worst patch's nearest bank patch m*."""
        _, support = self.index_.search(self.memory_bank_[nearest_ids], self.reweight_neighbors)
        diffs = self.memory_bank_[support] - worst_feats[:, None, :]  # [B, b, D]; support[:, 0] is m* itself
        dist = np.sqrt((diffs.astype(np.float64) ** 2).sum(-1))
        if self.distance == "squared_l2":
            dist = dist**2
        return reweight_weights(dist)

    def score_patch_features(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, S, S] for patch features [B, h*w, D]."""
        scores, grids = self.score_features(feats)
        return scores, anomaly_maps(grids, self.image_size)

    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats, _ = self.embed(batch)
        return self.score_patch_features(feats.numpy())

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json + memory_bank.npy + index.faiss (no pickle), atomically as one directory."""
        self.check_fitted()
        state = {"feature_grid": list(self.feature_grid_), "n_train_patches": self.n_train_patches_,
                 "memory_bank_shape": list(self.memory_bank_.shape),
                 "calibration": getattr(self, "calibration_", None)}
        return self._write_model(directory, {"memory_bank": self.memory_bank_}, state,
                                 extra_files=lambda tmp: self.index_.save(tmp / INDEX_FILE))

    @classmethod
    def _array_shapes(cls, state: dict[str, Any]) -> dict[str, list[int]]:
        return state.get("arrays") or {"memory_bank": state["memory_bank_shape"]}  # format-1 folders before 0.2

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> PatchCore:
        """Read a model written by `save`; an incompatible or incomplete directory fails with a clear message."""
        model, state, arrays = cls._read_model(directory, device)
        model.memory_bank_ = arrays["memory_bank"]
        model.feature_grid_ = tuple(state["feature_grid"])
        model.n_train_patches_ = state["n_train_patches"]
        model.set_calibration(state.get("calibration"))
        path = Path(directory) / INDEX_FILE
        try:
            model.index_ = NearestNeighbourIndex.load(path, device=str(model._runtime()))
        except Exception as exc:  # faiss raises RuntimeError on any unreadable file
            reason = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise IncompatibleModelError(f"{path} is not a readable faiss index: {reason}") from exc
        bank = model.memory_bank_.shape
        if (model.index_.ntotal_, model.index_.dim_) != bank or model.index_.holds(model.memory_bank_) is False:
            raise IncompatibleModelError(
                f"{path} does not belong to {Path(directory) / BANK_FILE}: it indexes other vectors "
                f"({model.index_.ntotal_} x {model.index_.dim_}; the bank is {bank[0]} x {bank[1]})")
        return model
