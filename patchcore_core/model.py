"""PatchCore as a scikit-learn-style estimator: the constructor stores config, `fit` learns, `predict` scores."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchcore_core import __version__
from patchcore_core.backbones import FeatureExtractor, get_spec
from patchcore_core.errors import IncompatibleModelError
from patchcore_core.features import PatchFeatureAggregator
from patchcore_core.index import NearestNeighbourIndex
from patchcore_core.io_utils import atomic_dir
from patchcore_core.runtime import configure_threads, resolve_device
from patchcore_core.sampler import make_sampler
from patchcore_core.scoring import anomaly_maps, patch_scores, reweight_weights

# Bump when the saved layout or the meaning of a saved field changes; loading checks it.
MODEL_FORMAT_VERSION = 1
CONFIG_FILE, BANK_FILE, INDEX_FILE = "config.json", "memory_bank.npy", "index.faiss"

Images = Sequence[str | os.PathLike] | torch.Tensor


class PatchCore:
    """PatchCore anomaly detector ("Towards Total Recall in Industrial Anomaly Detection").

    Fitted state: `memory_bank_` [k, D] float32 (the coreset), `index_` (faiss), `feature_grid_` (h, w),
    `n_train_patches_`. `pretrain_dim`/`target_dim`/`layers` default to the backbone's own defaults.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet50_2",
        layers: Sequence[str] | None = None,
        weights: str | None = None,
        patch_size: int = 3,
        pretrain_dim: int | None = None,
        target_dim: int | None = None,
        coreset_ratio: float = 0.1,
        coreset_method: str = "greedy",
        projection_dim: int = 128,
        num_neighbors: int = 1,
        reweight_neighbors: int = 0,
        distance: str = "l2",
        resize: int | None = 256,
        image_size: int = 224,
        index: str = "flat",
        device: str = "auto",
        seed: int = 0,
        batch_size: int = 16,
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
        self.resize = resize
        self.image_size = image_size
        self.index = index
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.progress = progress

    # ----------------------------------------------------------------- configuration
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as saved in config.json."""
        names = self.__init__.__code__.co_varnames[1 : self.__init__.__code__.co_argcount]
        params = {name: getattr(self, name) for name in names}
        params["layers"] = list(self.layers) if self.layers is not None else None
        return params

    def _resolved(self) -> tuple[list[str], int, int]:
        spec = get_spec(self.backbone)
        layers = list(self.layers) if self.layers else list(spec.default_layers)
        return layers, self.pretrain_dim or spec.default_pretrain_dim, self.target_dim or spec.default_target_dim

    def _setup(self) -> None:
        """Build the frozen backbone and aggregator once (lazily, so `load` reads no weights until used)."""
        if getattr(self, "extractor_", None) is not None:
            return
        if self.num_threads is not None:
            configure_threads(self.num_threads)
        self.device_ = resolve_device(self.device)
        layers, pretrain_dim, target_dim = self._resolved()
        self.extractor_ = FeatureExtractor(self.backbone, layers, self.weights, self.device_)
        self.aggregator_ = PatchFeatureAggregator(
            self.extractor_.channels, self.patch_size, pretrain_dim, target_dim
        )

    # ----------------------------------------------------------------- features
    def _batches(self, images: Images, desc: str) -> Iterator[torch.Tensor]:
        """Yield preprocessed image batches [B,3,S,S] from paths (decoded ahead in threads) or a tensor."""
        from patchcore_core.data import iter_batches

        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress, leave=False)
        if isinstance(images, torch.Tensor):
            batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        else:
            batches = (
                batch for batch, _ in iter_batches(
                    [str(p) for p in images], self.batch_size, self.resize, self.image_size, num_workers=2
                )
            )
        for batch in batches:
            yield batch
            bar.update(len(batch))
        bar.close()

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch features [B, h*w, D] (on CPU, float32) and the grid for one preprocessed batch [B,3,S,S]."""
        self._setup()
        layers = self.extractor_(images.to(self.device_))
        feats, grid = self.aggregator_([layers[name] for name in self.extractor_.layers])
        return feats.float().cpu(), grid

    def iter_features(self, images: Images, desc: str = "features") -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
        """Stream per-batch patch features [B, h*w, D] as numpy arrays, for callers that store them."""
        for batch in self._batches(images, desc):
            feats, grid = self.embed(batch)
            yield feats.numpy(), grid

    # ----------------------------------------------------------------- fit
    def fit(self, images: Images) -> PatchCore:
        """Extract all nominal patch features, subsample the coreset, and index it."""
        bank, grid = None, (0, 0)
        row = 0
        for feats, batch_grid in self.iter_features(images, desc="fit: features"):
            grid = batch_grid
            if bank is None:  # preallocate once: [n_images * h * w, D]
                bank = np.empty((len(images) * feats.shape[1], feats.shape[2]), dtype=np.float32)
            bank[row : row + feats.shape[0] * feats.shape[1]] = feats.reshape(-1, feats.shape[2])
            row += feats.shape[0] * feats.shape[1]
        if bank is None:
            raise ValueError("fit needs at least one image")
        return self.fit_features(bank[:row], grid)

    def fit_features(self, bank: np.ndarray, grid: tuple[int, int]) -> PatchCore:
        """Fit from precomputed patch features [N, D] (e.g. read back from Parquet shards)."""
        self._setup()
        sampler = make_sampler(
            self.coreset_method, self.coreset_ratio, projection_dim=self.projection_dim, seed=self.seed,
            device=str(self.device_), progress=self.progress,
        )
        selected = sampler.select(bank)
        return self.fit_memory_bank(bank[selected], grid, n_train_patches=len(bank))

    def fit_memory_bank(self, memory_bank: np.ndarray, grid: tuple[int, int], n_train_patches: int) -> PatchCore:
        """Set an already-selected memory bank [k, D] and build its search index."""
        self._setup()
        self.memory_bank_ = np.ascontiguousarray(memory_bank, dtype=np.float32)
        self.feature_grid_ = (int(grid[0]), int(grid[1]))
        self.n_train_patches_ = int(n_train_patches)
        self.index_ = NearestNeighbourIndex(self.index, device=str(self.device_), seed=self.seed)
        self.index_.fit(self.memory_bank_)
        return self

    # ----------------------------------------------------------------- predict
    def _check_fitted(self) -> None:
        if getattr(self, "index_", None) is None:
            raise RuntimeError("this PatchCore instance is not fitted yet: call fit() or PatchCore.load()")

    def score_features(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and patch-score grids [B, h, w] for patch features [B, h*w, D]."""
        self._check_fitted()
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

    def predict(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """Image anomaly scores [N] and anomaly maps [N, S, S] (float32, S = image_size)."""
        self._check_fitted()
        all_scores, all_maps = [], []
        for feats, _ in self.iter_features(images, desc="predict"):
            scores, grids = self.score_features(feats)
            all_scores.append(scores)
            all_maps.append(anomaly_maps(grids, self.image_size))
        if not all_scores:
            return np.zeros(0, np.float32), np.zeros((0, self.image_size, self.image_size), np.float32)
        return np.concatenate(all_scores), np.concatenate(all_maps)

    # ----------------------------------------------------------------- persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write config.json + memory_bank.npy + index.faiss (no pickle), atomically as one directory."""
        self._check_fitted()
        directory = Path(directory)
        config = {
            "format_version": MODEL_FORMAT_VERSION,
            "library_version": __version__,
            "model": "PatchCore",
            "params": self.get_params(),
            "state": {
                "feature_grid": list(self.feature_grid_),
                "n_train_patches": self.n_train_patches_,
                "memory_bank_shape": list(self.memory_bank_.shape),
            },
        }
        with atomic_dir(directory) as tmp:
            np.save(tmp / BANK_FILE, self.memory_bank_, allow_pickle=False)
            self.index_.save(tmp / INDEX_FILE)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> PatchCore:
        """Read a model written by `save`; an incompatible or incomplete directory fails with a clear message."""
        config = read_model_config(directory, expected_model="PatchCore")
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        known = set(cls.__init__.__code__.co_varnames[1 : cls.__init__.__code__.co_argcount])
        model = cls(**{k: v for k, v in params.items() if k in known})
        directory = Path(directory)
        bank = np.load(directory / BANK_FILE, allow_pickle=False)
        if list(bank.shape) != config["state"]["memory_bank_shape"]:
            raise IncompatibleModelError(f"{directory / BANK_FILE} has shape {bank.shape}, config says otherwise")
        model.memory_bank_ = bank
        model.feature_grid_ = tuple(config["state"]["feature_grid"])
        model.n_train_patches_ = config["state"]["n_train_patches"]
        model.device_ = resolve_device(model.device)
        model.index_ = NearestNeighbourIndex.load(directory / INDEX_FILE, device=str(model.device_))
        return model


def read_model_config(directory: str | os.PathLike, expected_model: str | None) -> dict[str, Any]:
    """Load and validate a saved model's config.json (format version; the model type unless it is None).

    Every saved detector (PatchCore, SPADE, PaDiM) shares this format and this check.
    """
    directory = Path(directory)
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise IncompatibleModelError(f"{directory} is not a saved model: {CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IncompatibleModelError(f"{path} is not valid JSON: {exc}") from exc
    if expected_model is None:
        return config
    fmt = config.get("format_version")
    if fmt != MODEL_FORMAT_VERSION:
        raise IncompatibleModelError(
            f"{directory} was saved in model format {fmt!r} by patchcore_core "
            f"{config.get('library_version', 'unknown')}; this is patchcore_core {__version__}, which reads "
            f"format {MODEL_FORMAT_VERSION}. Refit the model with this version (patchcore fit ...)."
        )
    if config.get("model") != expected_model:
        raise IncompatibleModelError(f"{directory} holds a {config.get('model')!r} model, not {expected_model!r}")
    return config
