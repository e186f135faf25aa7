"""What SPADE and PaDiM share beyond `Detector`: backbone layer maps as their features, and the chunked
nearest-distance kernel.

Both baselines work on raw backbone layer maps `{layer: Tensor[B, C, h, w]}`; `fit_features` and
`score_features` take those maps directly, so an experiment runner can extract them once and reuse them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch

from patchcore_core.backbones import FeatureExtractor, hierarchy_layers
from patchcore_core.estimator import Detector, Images

__all__ = ["LayerMapDetector", "LayerMaps", "hierarchy_layers", "min_sq_distances"]

LayerMaps = dict[str, torch.Tensor]


class LayerMapDetector(Detector):
    """Base of SPADE and PaDiM: the backbone's layer maps are the features."""

    def extractor_layers(self) -> list[str]:
        """Layers the backbone must return (subclasses)."""
        raise NotImplementedError

    def _extractor(self) -> FeatureExtractor:
        """Build the frozen backbone once, lazily (a loaded model reads no weights until it predicts)."""
        if getattr(self, "extractor_", None) is None:
            self.extractor_ = FeatureExtractor(self.backbone, self.extractor_layers(), self.weights, self._runtime())
        return self.extractor_

    def layer_maps(self, batch: torch.Tensor) -> LayerMaps:
        """Backbone layer maps {layer: Tensor[B, C, h, w]} of one preprocessed batch, on the compute device."""
        return self._extractor()(batch.to(self._runtime()))

    def iter_layer_maps(self, images: Images, desc: str = "features") -> Iterator[LayerMaps]:
        """Stream per-batch backbone layer maps."""
        for batch in self.image_batches(images, desc):
            yield self.layer_maps(batch)

    def fit(self, images: Images):
        """Fit on nominal images: paths (local or fsspec) or a preprocessed tensor [N,3,S,S] in [0,1]."""
        self._prepare(images)
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        return self.fit_features(self.iter_layer_maps(images, desc=f"{self.MODEL_NAME} fit"))

    def fit_features(self, batches: Iterable[LayerMaps]):  # pragma: no cover - abstract
        raise NotImplementedError

    def score_features(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Image scores [B] and anomaly maps [B, S, S] for one batch of layer maps."""
        raise NotImplementedError

    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return self.score_features(self.layer_maps(batch))


def min_sq_distances(queries: torch.Tensor, gallery: torch.Tensor, max_elements: int = 2**19) -> torch.Tensor:
    """Squared L2 distance of each query [M, C] to its nearest gallery row [N, C], in gallery chunks.

    Uses |q|² + |g|² − 2 q·g (one fused matmul per chunk, as faiss's Flat index does), clamped at 0. The
    M × chunk distance block stays under `max_elements` floats (2 MB by default): small enough to stay in
    cache, which makes this several times faster on CPU than large blocks, whatever the gallery size.
    """
    best = torch.full((queries.shape[0],), float("inf"), device=queries.device, dtype=queries.dtype)
    chunk = max(1, max_elements // max(1, queries.shape[0]))
    for start in range(0, gallery.shape[0], chunk):
        g = gallery[start : start + chunk]
        block = torch.addmm((g * g).sum(1)[None, :], queries, g.T, alpha=-2.0)  # |g|² − 2 q·g
        torch.minimum(best, block.amin(dim=1), out=best)
    return (best + (queries * queries).sum(1)).clamp_min_(0.0)
