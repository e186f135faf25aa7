"""PaDiM (Defard et al., "PaDiM: a Patch Distribution Modeling Framework"), as PatchCore compares it.

Layers 1–3 are concatenated on the layer-1 grid (coarser layers repeated onto it, i.e. nearest upsampling, as
the reference `embedding_concat` does), a fixed random subset of `n_features` channels is kept, and every grid
position gets a Gaussian: mean and covariance over the train images, plus `epsilon`·I. The score of a test
position is its Mahalanobis distance; the score grid is upsampled bilinearly to the image size and blurred
(σ = 4); the image score is the maximum of that map (as in the reference implementation).

Memory: only the state is kept — mean [P, d] and inverse covariance [P, d, d] (float32, P = positions of the
layer-1 grid). Fitting streams image batches and merges per-batch centred sums of outer products (Chan et
al.'s pairwise update, stable where "sum of x xᵀ minus n·μμᵀ" is not); inversion and Mahalanobis distances run
in chunks of positions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patchcore_core.baselines._common import LayerMapDetector, LayerMaps, hierarchy_layers
from patchcore_core.config import DEFAULTS as D
from patchcore_core.scoring import anomaly_maps

# Channels kept per backbone. ResNet-18 (100 of 448) and WRN-50 (550 of 1792) are the PaDiM paper's.
# EfficientNet-Lite0/1 layer1–3 (blocks.1/2/4) have only 24 + 40 + 112 = 176 channels: 100 keeps d at the
# value the PaDiM paper found sufficient for ResNet-18, keeps d about half the number of train images of
# a typical MVTec category (60–391), so the per-position covariance is estimated from more samples than it
# has dimensions rather than being held up by ε·I, and keeps the state small (P·d² = 3136·100² floats ≈ 125 MB).
DEFAULT_N_FEATURES = {
    "resnet18": 100,
    "wide_resnet50_2": 550,
    "wide_resnet101_2": 550,
    "efficientnet_lite0": 100,
    "efficientnet_lite1": 100,
    "efficientnet_lite2": 100,
}
# Accumulate in float64 while the [P, d, d] accumulator stays under this size; float32 above (WRN-50: 3.8 GB).
_FLOAT64_ACCUMULATOR_BYTES = 1 << 30


class PaDiM(LayerMapDetector):
    """PaDiM anomaly detector with the PatchCore estimator contract (fit / predict / save / load).

    `layers`: default hierarchy levels 1–3 (layer1–3; blocks.1/2/4 for EfficientNet-Lite), finest first.
    `n_features`: channels kept (default per backbone, see `DEFAULT_N_FEATURES`), chosen at random with `seed`.
    `position_chunk`: grid positions processed at once in the covariance update, inversion and scoring.

    Fitted state: `channel_idx_` [d] int64 (into the concatenated channels), `mean_` [P, d] float32,
    `inv_covariance_` [P, d, d] float32, `feature_grid_` (h, w), `n_train_`.
    """

    MODEL_NAME = "PaDiM"
    FITTED_ATTR = "inv_covariance_"

    def __init__(
        self,
        backbone: str = D.backbone,
        layers: Sequence[str] | None = None,
        n_features: int | None = D.n_features,
        weights: str | None = D.weights,
        epsilon: float = 0.01,
        resize: int | None = D.resize,
        image_size: int = D.image_size,
        sigma: float = 4.0,
        device: str = "auto",
        seed: int = D.seed,
        batch_size: int = D.batch_size,
        position_chunk: int = 256,
        num_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.n_features = n_features
        self.weights = weights
        self.epsilon = epsilon
        self.resize = resize
        self.image_size = image_size
        self.sigma = sigma
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.position_chunk = position_chunk
        self.num_threads = num_threads
        self.progress = progress

    # ------------------------------------------------------------------ configuration
    def resolved_layers(self) -> list[str]:
        levels = hierarchy_layers(self.backbone)
        return list(self.layers) if self.layers else [levels[1], levels[2], levels[3]]

    def extractor_layers(self) -> list[str]:
        return self.resolved_layers()

    def resolved_n_features(self, total: int) -> int:
        """Channels kept out of the `total` of the layers (default per backbone)."""
        wanted = self.n_features or DEFAULT_N_FEATURES.get(self.backbone, min(total, 100))
        if not 1 <= wanted <= total:
            raise ValueError(f"n_features must be in [1, {total}] for layers {self.resolved_layers()}, got {wanted}")
        return int(wanted)

    def _choose_channels(self, maps: LayerMaps) -> np.ndarray:
        """A seeded random subset of the layers' channels (counted on the first batch of maps)."""
        total = sum(int(maps[layer].shape[1]) for layer in self.resolved_layers())
        rng = np.random.default_rng(self.seed)
        return np.sort(rng.choice(total, self.resolved_n_features(total), replace=False)).astype(np.int64)

    # ------------------------------------------------------------------ embedding
    def embed(self, maps: LayerMaps) -> tuple[torch.Tensor, tuple[int, int]]:
        """The kept channels of layers 1–3 on the layer-1 grid: (float32 [B, P, d] on the compute device, grid).

        Channels are selected per layer before the (nearest) upsampling, so no full-width map is built.
        """
        device = self._runtime()
        layers = self.resolved_layers()
        grid = tuple(maps[layers[0]].shape[-2:])
        parts, offset = [], 0
        for layer in layers:
            fmap = maps[layer]
            c = fmap.shape[1]
            keep = self.channel_idx_[(self.channel_idx_ >= offset) & (self.channel_idx_ < offset + c)] - offset
            offset += c
            if len(keep) == 0:
                continue
            sel = fmap[:, torch.from_numpy(keep).to(fmap.device)].float().to(device)
            if tuple(sel.shape[-2:]) != grid:
                sel = F.interpolate(sel, size=grid, mode="nearest")
            parts.append(sel)
        emb = torch.cat(parts, dim=1)  # [B, d, h, w], channel order = sorted channel_idx_
        return emb.flatten(2).transpose(1, 2).contiguous(), grid

    # ------------------------------------------------------------------ fit
    def fit_features(self, batches: Iterable[LayerMaps]) -> PaDiM:
        """Fit from backbone layer maps, one dict {layer: Tensor[B, C, h, w]} per batch (streamed)."""
        self._prepare()
        device = self._runtime()
        count, mean, m2, grid = 0, None, None, None
        for maps in batches:
            if m2 is None:
                self.channel_idx_ = self._choose_channels(maps)
            emb, grid = self.embed(maps)
            if m2 is None:
                p, d = emb.shape[1], emb.shape[2]
                dtype = torch.float64 if p * d * d * 8 <= _FLOAT64_ACCUMULATOR_BYTES else torch.float32
                mean = torch.zeros((p, d), dtype=dtype, device=device)
                m2 = torch.zeros((p, d, d), dtype=dtype, device=device)
            x = emb.to(mean.dtype)
            n_b = x.shape[0]
            mean_b = x.mean(dim=0)
            centred = x - mean_b
            delta = mean_b - mean
            total = count + n_b
            for s in range(0, m2.shape[0], self.position_chunk):
                e = slice(s, s + self.position_chunk)
                m2[e] += torch.einsum("bpi,bpj->pij", centred[:, e], centred[:, e])
                m2[e] += delta[e, :, None] * delta[e, None, :] * (count * n_b / total)
            mean += delta * (n_b / total)
            count = total
        if m2 is None:
            raise ValueError("fit needs at least one image")
        self.n_train_ = count
        self.feature_grid_ = (int(grid[0]), int(grid[1]))
        self.mean_ = mean.float().cpu().numpy()
        self.inv_covariance_ = self._invert(m2, count)
        self._device_cache = None
        return self

    def _invert(self, m2: torch.Tensor, count: int) -> np.ndarray:
        """(M2 / (n − 1) + ε·I)⁻¹ per position in chunks, in float64, into a float32 [P, d, d] array."""
        p, d, _ = m2.shape
        out = np.empty((p, d, d), dtype=np.float32)
        eye = torch.eye(d, dtype=torch.float64, device=m2.device)
        for s in range(0, p, self.position_chunk):
            cov = m2[s : s + self.position_chunk].double() / max(count - 1, 1) + self.epsilon * eye
            out[s : s + self.position_chunk] = torch.linalg.inv(cov).float().cpu().numpy()
        return out

    # ------------------------------------------------------------------ predict
    def _state_chunk(self, e: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [p, d] and inverse covariance [p, d, d] of positions `e` as tensors on the compute device.

        On CPU these are zero-copy views of the arrays (a memory-mapped state is read chunk by chunk); on a
        GPU the whole state is copied there once and kept.
        """
        device = self._runtime()
        if device.type == "cpu":
            mean, inv = self.mean_[e], self.inv_covariance_[e]
            if not inv.flags.writeable:  # memory-mapped read-only: copy this chunk only
                mean, inv = np.array(mean), np.array(inv)
            return torch.from_numpy(mean), torch.from_numpy(inv)
        cache = getattr(self, "_device_cache", None)
        if cache is None or cache[0].device != device:
            cache = tuple(torch.from_numpy(np.array(a, dtype=np.float32)).to(device)
                          for a in (self.mean_, self.inv_covariance_))
            self._device_cache = cache
        return cache[0][e], cache[1][e]

    def mahalanobis(self, emb: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distances [B, P] of embeddings [B, P, d], batched over images, chunked over positions."""
        out = torch.empty(emb.shape[:2], dtype=torch.float32, device=emb.device)
        for s in range(0, emb.shape[1], self.position_chunk):
            e = slice(s, s + self.position_chunk)
            mean, inv = self._state_chunk(e)
            delta = emb[:, e] - mean
            out[:, e] = torch.einsum("bpj,bpj->bp", torch.einsum("bpi,pij->bpj", delta, inv), delta)
        return out.clamp_min_(0.0).sqrt_()

    def score_features(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] (max of the map) and anomaly maps [B, S, S] for one batch of layer maps."""
        self.check_fitted()
        emb, grid = self.embed(maps)
        if grid != tuple(self.feature_grid_):
            raise ValueError(f"feature grid {grid} differs from the fitted {tuple(self.feature_grid_)}: "
                             f"images must be {self.image_size}x{self.image_size} as at fit time")
        dist = self.mahalanobis(emb).reshape(-1, *grid).cpu().numpy()
        amaps = anomaly_maps(dist, self.image_size, sigma=self.sigma)
        return amaps.reshape(len(amaps), -1).max(axis=1).astype(np.float32), amaps

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """config.json + mean.npy + inv_covariance.npy + channel_idx.npy (no pickle)."""
        self.check_fitted()
        arrays = {"mean": self.mean_, "inv_covariance": self.inv_covariance_, "channel_idx": self.channel_idx_}
        state = {"n_train": self.n_train_, "feature_grid": list(self.feature_grid_)}
        return self._write_model(directory, arrays, state)

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None, mmap: bool = False) -> PaDiM:
        """Read a model written by `save`; `mmap=True` memory-maps the inverse covariances."""
        model, state, arrays = cls._read_model(directory, device, mmap=mmap)
        model.mean_ = np.array(arrays["mean"], dtype=np.float32)
        model.inv_covariance_ = arrays["inv_covariance"]
        model.channel_idx_ = np.asarray(arrays["channel_idx"], dtype=np.int64)
        model.n_train_ = int(state["n_train"])
        model.feature_grid_ = tuple(state["feature_grid"])
        model._device_cache = None
        return model
