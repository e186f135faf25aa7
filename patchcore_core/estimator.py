"""What every detector (PatchCore, SPADE, PaDiM) shares: the scikit-learn estimator contract, validation of the
settings against the one schema, the image batcher, the scoring loop, and the saved-model folder format.

A detector subclasses `Detector`, takes its settings as explicit constructor arguments (stored unchanged, so
`get_params`/`set_params`/`sklearn.base.clone` work) and implements `fit`, `score_batch` and `save`/`load`
over `_write_model`/`_read_model`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator
from tqdm.auto import tqdm

from patchcore_core import __version__
from patchcore_core.artifacts import (
    CONFIG_FILE,
    MODEL_FORMAT_VERSION,
    READABLE_MODEL_FORMATS,
    atomic_dir,
    file_digest,
)
from patchcore_core.config import DetectorParams, validate_params
from patchcore_core.errors import DataError, IncompatibleModelError
from patchcore_core.runtime import configure_threads, resolve_device, tune_allocator
from patchcore_core.scoring import score_stream

Images = Sequence[str | os.PathLike] | torch.Tensor

__all__ = ["Detector", "Images", "read_model_config"]


class Detector(BaseEstimator):
    """Base of the detectors. Subclasses set `MODEL_NAME` and `FITTED_ATTR` (an attribute only `fit` sets)."""

    MODEL_NAME = ""
    FITTED_ATTR = ""
    # Constructor arguments that are objects or runtime choices, not settings: never saved, never validated.
    RUNTIME_PARAMS = ("device", "num_threads", "progress")

    # ------------------------------------------------------------------ settings
    def settings(self) -> DetectorParams:
        """This detector's settings, validated against the schema (`ConfigError` names a bad one)."""
        params = self.get_params(deep=False)
        schema = {k: v for k, v in params.items() if k in DetectorParams.model_fields}
        if schema.get("layers") is not None:
            schema["layers"] = list(schema["layers"])
        return validate_params(schema, method=self.MODEL_NAME.lower())

    def saved_params(self) -> dict[str, Any]:
        """Constructor arguments as written to config.json: JSON values only (injected objects are left out)."""
        params = {}
        for name, value in self.get_params(deep=False).items():
            if isinstance(value, tuple):
                value = list(value)
            if value is None or isinstance(value, str | int | float | bool | list):
                params[name] = value
        return params

    def _prepare(self, images: Images | None = None) -> None:
        """Checks and set-up before any heavy work: settings valid, every input image usable (header read, size
        and pixel limits; all bad files named at once), threads set, device resolved."""
        self.settings()
        check_inputs(images)
        self._runtime()

    def _runtime(self) -> torch.device:
        """Set the thread count (when given) and resolve the device once."""
        if getattr(self, "device_", None) is None:
            tune_allocator()
            if self.num_threads is not None:
                configure_threads(self.num_threads)
            self.device_ = resolve_device(self.device)
        return self.device_

    # ------------------------------------------------------------------ images → scores
    def image_batches(self, images: Images, desc: str) -> Iterator[torch.Tensor]:
        """Preprocessed image batches [B,3,S,S] from paths (decoded ahead in threads) or a tensor, with a bar."""
        from patchcore_core.data import iter_batches

        bar = tqdm(total=len(images), desc=desc, unit="img", disable=not self.progress, leave=False)
        if isinstance(images, torch.Tensor):
            batches = (images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size))
        else:
            batches = (batch for batch, _ in iter_batches(
                [str(p) for p in images], self.batch_size, self.resize, self.image_size, num_workers=2))
        for batch in batches:
            yield batch
            bar.update(len(batch))
        bar.close()

    def score_batch(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        """Image scores [B] and anomaly maps [B, S, S] of one preprocessed batch."""
        raise NotImplementedError

    def check_fitted(self) -> None:
        if getattr(self, self.FITTED_ATTR, None) is None:
            name = type(self).__name__
            raise RuntimeError(f"this {name} instance is not fitted yet: call fit() or {name}.load()")

    def predict(self, images: Images) -> tuple[np.ndarray, np.ndarray]:
        """Image anomaly scores [N] and anomaly maps [N, S, S] (float32, S = image_size)."""
        self.check_fitted()
        check_inputs(images)
        batches = ((None, batch) for batch in self.image_batches(images, f"{self.MODEL_NAME} predict"))
        return score_stream(batches, self.score_batch, len(images), self.image_size)

    # ------------------------------------------------------------------ persistence
    def _write_model(self, directory: str | os.PathLike, arrays: dict[str, np.ndarray], state: dict[str, Any],
                     extra_files=None) -> Path:
        """config.json + one .npy per array (+ `extra_files(tmp_dir)`), written as one atomic folder.

        config.json (written last) records every array's shape and the sha256 of every other file, so loading
        can tell a damaged or mixed-up folder from a good one.
        """
        directory = Path(directory)
        for name, array in arrays.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                raise DataError(f"refusing to save {self.MODEL_NAME}: {name} holds non-finite values")
        with atomic_dir(directory) as tmp:
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
            if extra_files is not None:
                extra_files(tmp)
            files = {p.name: file_digest([p]) for p in sorted(tmp.iterdir()) if p.is_file()}
            config = {
                "format_version": MODEL_FORMAT_VERSION,
                "library_version": __version__,
                "model": self.MODEL_NAME,
                "params": self.saved_params(),
                "state": {**state, "arrays": {name: list(a.shape) for name, a in arrays.items()}},
                "files": {name: {"sha256": digest} for name, digest in files.items()},
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def _read_model(cls, directory: str | os.PathLike, device: str | None, mmap: bool = False
                    ) -> tuple[Any, dict[str, Any], dict[str, np.ndarray]]:
        """(unfitted model from the saved params, state dict, arrays checked against their saved shapes)."""
        config = read_model_config(directory, expected_model=cls.MODEL_NAME)
        params = dict(config["params"])
        if device is not None:
            params["device"] = device
        accepted = cls._get_param_names()
        model = cls(**{k: v for k, v in params.items() if k in accepted})
        directory = Path(directory)
        verify_files(directory, config)
        arrays = {}
        for name, shape in cls._array_shapes(config["state"]).items():
            path = directory / f"{name}.npy"
            if not path.is_file():
                raise IncompatibleModelError(f"{directory} is incomplete: {path.name} is missing")
            try:
                array = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
            except Exception as exc:  # truncated, not an .npy, pickled objects
                raise IncompatibleModelError(f"{path} is damaged: {type(exc).__name__}: {exc}") from exc
            if list(array.shape) != list(shape):
                raise IncompatibleModelError(f"{path} has shape {list(array.shape)}, config.json says {shape}")
            if np.issubdtype(array.dtype, np.floating) and not mmap and not np.isfinite(array).all():
                raise IncompatibleModelError(f"{path} holds non-finite values (NaN or infinity)")
            arrays[name] = array
        # config.json names every file by its sha256: its own digest identifies the whole model.
        model.model_fingerprint_ = file_digest([directory / CONFIG_FILE])[:16]
        return model, config["state"], arrays


    @classmethod
    def _array_shapes(cls, state: dict[str, Any]) -> dict[str, list[int]]:
        """{array name: shape} a saved state promises (subclasses read older layouts here)."""
        return state["arrays"]


def check_inputs(images: Images | None) -> None:
    """Refuse unusable input images up front (DataError naming each); tensors are already preprocessed."""
    if images is not None and not isinstance(images, torch.Tensor):
        from patchcore_core.data import require_images

        require_images([str(p) for p in images])


def verify_files(directory: Path, config: dict[str, Any]) -> None:
    """Every file config.json lists is present with its recorded sha256 (format 1 folders list none)."""
    for name, meta in config.get("files", {}).items():
        path = directory / name
        if not path.is_file():
            raise IncompatibleModelError(f"{directory} is incomplete: {name} is missing")
        if file_digest([path]) != meta["sha256"]:
            raise IncompatibleModelError(f"{path} does not match config.json (sha256 differs): the file is damaged "
                                         "or comes from another model")


def read_model_config(directory: str | os.PathLike, expected_model: str | None) -> dict[str, Any]:
    """Load and validate a saved model's config.json (format version; the model type unless it is None)."""
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
    if fmt not in READABLE_MODEL_FORMATS:
        raise IncompatibleModelError(
            f"{directory} was saved in model format {fmt!r} by patchcore_core "
            f"{config.get('library_version', 'unknown')}; this is patchcore_core {__version__}, which reads "
            f"formats {list(READABLE_MODEL_FORMATS)}. Refit the model with this version (patchcore fit ...)."
        )
    if config.get("model") != expected_model:
        raise IncompatibleModelError(f"{directory} holds a {config.get('model')!r} model, not {expected_model!r}")
    return config
