"""SPADE (Cohen & Hoshen, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences"), as PatchCore compares it.

Image level: each test image's global-average-pooled last-stage feature is compared with those of the train
images; the image score is the mean L2 distance to its K nearest (K = 50). Pixel level: the gallery is every
spatial feature of those K train images at the pyramid layers (layer1–3 by default: the 56/28/14 grids at
224); each test position scores its smallest L2 distance to that layer's gallery, each layer's score map is
upsampled bilinearly to the image size, the layers are averaged and the result blurred with σ = 4.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from patchcore_core.baselines._common import LayerMapDetector, LayerMaps, hierarchy_layers, min_sq_distances
from patchcore_core.config import DEFAULTS as D
from patchcore_core.index import NearestNeighbourIndex
from patchcore_core.scoring import anomaly_maps


class SPADE(LayerMapDetector):
    """SPADE anomaly detector with the PatchCore estimator contract (fit / predict / save / load).

    `layers`: the pyramid layers of the pixel-level kNN (default: hierarchy levels 1–3 of the backbone, e.g.
    layer1–3 or blocks.1/2/4 for EfficientNet-Lite); a single layer reproduces the SPADE paper's Table 6
    ablation. `global_layer`: the layer pooled for the image-level kNN (default: the last stage, layer4 or
    blocks.6). `k_images`: K nearest train images (capped at the number of train images).

    Fitted state: `train_embeddings_` [N, C_global] float32, `gallery_` {layer: [N, C, h, w] float32},
    `index_` (faiss Flat over the train embeddings), `n_train_`.
    """

    MODEL_NAME = "SPADE"
    FITTED_ATTR = "index_"

    def __init__(
        self,
        backbone: str = D.backbone,
        layers: Sequence[str] | None = None,
        global_layer: str | None = None,
        weights: str | None = D.weights,
        k_images: int = D.k_images,
        resize: int | None = D.resize,
        image_size: int = D.image_size,
        sigma: float = 4.0,
        device: str = "auto",
        seed: int = D.seed,
        batch_size: int = D.batch_size,
        num_threads: int | None = None,
        progress: bool = True,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.global_layer = global_layer
        self.weights = weights
        self.k_images = k_images
        self.resize = resize
        self.image_size = image_size
        self.sigma = sigma
        self.device = device
        self.seed = seed
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.progress = progress

    # ------------------------------------------------------------------ configuration
    def resolved_layers(self) -> tuple[list[str], str]:
        """(pixel-level pyramid layers, image-level global layer) with the backbone defaults filled in."""
        levels = hierarchy_layers(self.backbone)
        layers = list(self.layers) if self.layers else [levels[1], levels[2], levels[3]]
        return layers, self.global_layer or levels[4]

    def extractor_layers(self) -> list[str]:
        layers, global_layer = self.resolved_layers()
        return list(dict.fromkeys([*layers, global_layer]))

    # ------------------------------------------------------------------ fit
    def fit_features(self, batches: Iterable[LayerMaps]) -> SPADE:
        """Fit from backbone layer maps, one dict {layer: Tensor[B, C, h, w]} per batch."""
        self._prepare()
        layers, global_layer = self.resolved_layers()
        embeddings: list[np.ndarray] = []
        gallery: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
        for maps in batches:
            embeddings.append(_global_pool(maps[global_layer]))
            for layer in layers:
                gallery[layer].append(maps[layer].float().cpu().numpy())
        if not embeddings:
            raise ValueError("fit needs at least one image")
        self.gallery_ = {layer: np.concatenate(parts) for layer, parts in gallery.items()}
        self.train_embeddings_ = np.concatenate(embeddings)
        self.n_train_ = len(self.train_embeddings_)
        self._build_index()
        return self

    def _build_index(self) -> None:
        device = self._runtime()
        self.index_ = NearestNeighbourIndex("flat", device=str(device), seed=self.seed).fit(self.train_embeddings_)

    # ------------------------------------------------------------------ predict
    def nearest_train_images(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        """Image-level kNN: (L2 distances [B, K], train image ids [B, K]) by the pooled global feature."""
        self.check_fitted()
        _, global_layer = self.resolved_layers()
        sq, ids = self.index_.search(_global_pool(maps[global_layer]), min(self.k_images, self.n_train_))
        return np.sqrt(np.maximum(sq, 0.0)), ids

    def score_features(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [B] and anomaly maps [B, S, S] for one batch of backbone layer maps."""
        dists, ids = self.nearest_train_images(maps)
        scores = dists.mean(axis=1).astype(np.float32)
        layers, _ = self.resolved_layers()
        device = self._runtime()
        size = (self.image_size, self.image_size)
        tests = [maps[layer].float().to(device) for layer in layers]  # [B, C, h, w] each

        def one_image(b: int) -> list[torch.Tensor]:
            """Per layer [h, w]: min L2 from each position to every feature of image b's K nearest train images."""
            grids = []
            for layer, test in zip(layers, tests, strict=True):
                _, c, h, w = test.shape
                gal = torch.from_numpy(self.gallery_[layer][np.sort(ids[b])]).to(device)  # [K, C, h', w']
                gal = gal.permute(0, 2, 3, 1).reshape(-1, c)
                queries = test[b].permute(1, 2, 0).reshape(-1, c)
                grids.append(min_sq_distances(queries, gal).sqrt().reshape(h, w))
            return grids

        per_image = _map_images(one_image, len(ids), device)
        total = torch.zeros((len(ids), 1, *size), dtype=torch.float32, device=device)
        for i in range(len(layers)):
            grids = torch.stack([g[i] for g in per_image]).unsqueeze(1)
            total += F.interpolate(grids, size=size, mode="bilinear", align_corners=False)
        mean = (total / len(layers)).squeeze(1).cpu().numpy()
        # anomaly_maps at the output size is the identity resize followed by the σ blur.
        return scores, anomaly_maps(mean, size, sigma=self.sigma)

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """config.json + train_embeddings.npy + one gallery__<layer>.npy per pyramid layer (no pickle)."""
        self.check_fitted()
        arrays = {"train_embeddings": self.train_embeddings_}
        arrays.update({f"gallery__{layer}": g for layer, g in self.gallery_.items()})
        return self._write_model(directory, arrays, {"n_train": self.n_train_, "layers": list(self.gallery_)})

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None, mmap: bool = False) -> SPADE:
        """Read a model written by `save`; `mmap=True` memory-maps the galleries instead of reading them."""
        model, state, arrays = cls._read_model(directory, device, mmap=mmap)
        model.train_embeddings_ = np.ascontiguousarray(arrays["train_embeddings"])
        model.gallery_ = {layer: arrays[f"gallery__{layer}"] for layer in state["layers"]}
        model.n_train_ = int(state["n_train"])
        model._build_index()
        return model


def _map_images(fn, n: int, device: torch.device) -> list:
    """[fn(0), ..., fn(n-1)]; on a multi-threaded CPU, images run in parallel, each single-threaded.

    The per-image work is thousands of small matmul/min blocks. Splitting each block over torch's intra-op
    threads puts a thread barrier in every one, which is slow on a dedicated machine and very slow on a
    shared one (measured: 10x slower with 2 threads than with 1 when other jobs load the cores). One image per
    thread has no barriers. torch's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads <= 1 or n <= 1:
        return [fn(i) for i in range(n)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(threads, n)) as pool:
            return list(pool.map(fn, range(n)))
    finally:
        torch.set_num_threads(threads)


def _global_pool(fmap: torch.Tensor) -> np.ndarray:
    """Global average pooling [B, C, h, w] → float32 numpy [B, C]."""
    return fmap.float().mean(dim=(2, 3)).cpu().numpy().astype(np.float32)
