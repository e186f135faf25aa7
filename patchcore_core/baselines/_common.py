"""What SPADE and PaDiM share with PatchCore: config handling, image batches, backbone layer maps, save/load.

Both baselines work on raw backbone layer maps `{layer: Tensor[B, C, h, w]}`; `fit_features` and
`score_features` take those maps directly, so an experiment runner can extract them once and reuse them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from patchcore_core import __version__
from patchcore_core.backbones import FeatureExtractor, get_spec
from patchcore_core.errors import IncompatibleModelError
from patchcore_core.io_utils import atomic_dir
from patchcore_core.model import MODEL_FORMAT_VERSION, read_model_config
from patchcore_core.runtime import configure_threads, resolve_device

# Same on-disk contract as PatchCore: config.json + .npy arrays, no pickle.
CONFIG_FILE = "config.json"

Images = Sequence[str | os.PathLike] | torch.Tensor
LayerMaps = dict[str, torch.Tensor]


def hierarchy_layers(backbone: str) -> dict[int, str]:
    """The backbone's layer names by ResNet hierarchy level 1..4 (strides 4, 8, 16, 32).

    torchvision ResNets: layer1..layer4. EfficientNet-Lite: blocks.1 (stride 4), blocks.2 (8), blocks.4 (16),
    blocks.6 (32, the last stage), i.e. the last block of each resolution the ResNet levels correspond to.
    """
    spec = get_spec(backbone)
    if spec.family == "torchvision":
        return {i: f"layer{i}" for i in range(1, 5)}
    return {1: "blocks.1", 2: "blocks.2", 3: "blocks.4", 4: "blocks.6"}


class LayerMapDetector:
    """Base of SPADE and PaDiM: stores constructor params, extracts layer maps, writes/reads saved models."""

    MODEL_NAME = ""

    # ------------------------------------------------------------------ configuration
    def get_params(self) -> dict[str, Any]:
        """Constructor arguments, as saved in config.json."""
        code = type(self).__init__.__code__
        params = {name: getattr(self, name) for name in code.co_varnames[1 : code.co_argcount]}
        if params.get("layers") is not None:
            params["layers"] = list(params["layers"])
        return params

    def extractor_layers(self) -> list[str]:
        """Layers the backbone must return (subclasses)."""
        raise NotImplementedError

    def _setup(self) -> None:
        """Build the frozen backbone once, lazily (a loaded model reads no weights until it predicts)."""
        if getattr(self, "extractor_", None) is not None:
            return
        if self.num_threads is not None:
            configure_threads(self.num_threads)
        self.device_ = resolve_device(self.device)
        self.extractor_ = FeatureExtractor(self.backbone, self.extractor_layers(), self.weights, self.device_)

    def _compute_device(self) -> torch.device:
        """The device for the method's own tensor work (the backbone's, or resolved without building it)."""
        if getattr(self, "device_", None) is None:
            self.device_ = resolve_device(self.device)
        return self.device_

    # ------------------------------------------------------------------ images → layer maps
    def _batches(self, images: Images, desc: str) -> Iterator[torch.Tensor]:
        """Preprocessed image batches [B,3,S,S] from paths or an already-preprocessed tensor."""
        from patchcore_core.data import load_images

        total = len(images)
        bar = tqdm(total=total, desc=desc, unit="img", disable=not self.progress, leave=False)
        for start in range(0, total, self.batch_size):
            chunk = images[start : start + self.batch_size]
            if not isinstance(chunk, torch.Tensor):
                chunk = load_images(list(chunk), resize=self.resize, image_size=self.image_size)
            yield chunk
            bar.update(len(chunk))
        bar.close()

    def iter_layer_maps(self, images: Images, desc: str = "features") -> Iterator[LayerMaps]:
        """Stream per-batch backbone layer maps {layer: Tensor[B, C, h, w]} on the compute device."""
        self._setup()
        for batch in self._batches(images, desc):
            yield self.extractor_(batch.to(self.device_))

    def fit(self, images: Images):
        """Fit on nominal images: paths (local or fsspec) or a preprocessed tensor [N,3,S,S] in [0,1]."""
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        return self.fit_features(self.iter_layer_maps(images, desc=f"{self.MODEL_NAME} fit"))

    def fit_features(self, batches: Iterable[LayerMaps]):  # pragma: no cover - abstract
        raise NotImplementedError

    def score_features(self, maps: LayerMaps) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
        raise NotImplementedError

    def _check_fitted(self) -> None:
        raise NotImplementedError

    def predict(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """Image anomaly scores [N] and anomaly maps [N, S, S] (float32, S = image_size)."""
        self._check_fitted()
        scores, maps = [], []
        for layer_maps in self.iter_layer_maps(images, desc=f"{self.MODEL_NAME} predict"):
            s, m = self.score_features(layer_maps)
            scores.append(s)
            maps.append(m)
        if not scores:
            return np.zeros(0, np.float32), np.zeros((0, self.image_size, self.image_size), np.float32)
        return np.concatenate(scores), np.concatenate(maps)

    # ------------------------------------------------------------------ persistence
    def _write(self, directory: str | os.PathLike, arrays: dict[str, np.ndarray], state: dict[str, Any]) -> Path:
        """config.json + one .npy per array, written into a temporary directory renamed into place."""
        directory = Path(directory)
        config = {
            "format_version": MODEL_FORMAT_VERSION,
            "library_version": __version__,
            "model": self.MODEL_NAME,
            "params": self.get_params(),
            "state": {**state, "arrays": {name: list(a.shape) for name, a in arrays.items()}},
        }
        with atomic_dir(directory) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def _read(
        cls, directory: str | os.PathLike, device: str | None, mmap: bool = False
    ) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
        """(unfitted model from the saved params, state dict, arrays checked against their saved shapes)."""
        config = read_config(directory, expected_model=cls.MODEL_NAME)
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        code = cls.__init__.__code__
        known = set(code.co_varnames[1 : code.co_argcount])
        model = cls(**{k: v for k, v in params.items() if k in known})
        directory = Path(directory)
        arrays = {}
        for name, shape in config["state"]["arrays"].items():
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise IncompatibleModelError(f"{directory} is incomplete: {path.name} is missing")
            array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            if list(array.shape) != list(shape):
                raise IncompatibleModelError(f"{path} has shape {list(array.shape)}, config.json says {shape}")
            arrays[name] = array
        return model, config["state"], arrays


def read_config(directory: str | os.PathLike, expected_model: str | None = None) -> dict[str, Any]:
    """Load a saved model's config.json and check its format version (and model type when given)."""
    return read_model_config(directory, expected_model)


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
