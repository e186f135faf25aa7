"""Baselines PatchCore is compared with (SPADE, PaDiM), and one entry point for all three methods.

`make_detector("patchcore" | "spade" | "padim", **params)` builds an unfitted estimator;
`load_detector(directory)` reads any saved model, dispatching on config.json's "model" field.
All three share the contract: `fit(images)`, `predict(images) -> (scores [N], maps [N, S, S])`,
`save(dir)`, `Class.load(dir, device=...)`, and the attributes `resize` and `image_size`.
"""

from __future__ import annotations

import os
from typing import Any

from patchcore_core.baselines.padim import PaDiM
from patchcore_core.baselines.spade import SPADE
from patchcore_core.errors import IncompatibleModelError

__all__ = ["METHODS", "PaDiM", "SPADE", "detector_class", "detector_params", "load_detector", "make_detector"]

METHODS = ("patchcore", "spade", "padim")
_MODEL_NAMES = {"PatchCore": "patchcore", "SPADE": "spade", "PaDiM": "padim"}


def detector_class(method: str) -> type:
    """The estimator class of a method name (case-insensitive): patchcore, spade or padim."""
    key = str(method).lower()
    if key == "patchcore":
        from patchcore_core.model import PatchCore

        return PatchCore
    if key == "spade":
        return SPADE
    if key == "padim":
        return PaDiM
    raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")


def detector_params(method: str) -> list[str]:
    """Names of the constructor parameters a method accepts."""
    return list(detector_class(method)._get_param_names())


def make_detector(method: str, strict: bool = True, **params: Any):
    """Build an unfitted PatchCore / SPADE / PaDiM with `params`.

    With `strict=False`, parameters the method does not take are dropped (a CLI or flow can pass one shared
    option set, e.g. coreset_ratio, to every method); with `strict=True` (default) they raise TypeError.
    """
    cls = detector_class(method)
    accepted = set(detector_params(method))
    unknown = sorted(set(params) - accepted)
    if unknown and strict:
        raise TypeError(f"{cls.__name__} does not take parameter(s) {unknown}; it takes {sorted(accepted)}")
    return cls(**{k: v for k, v in params.items() if k in accepted})


def load_detector(directory: str | os.PathLike, device: str | None = None, **kwargs: Any):
    """Load any saved model (PatchCore, SPADE or PaDiM) by the "model" field of its config.json."""
    from patchcore_core.estimator import read_model_config

    name = read_model_config(directory, expected_model=None).get("model")
    if name not in _MODEL_NAMES:
        raise IncompatibleModelError(f"{directory} holds an unknown model type {name!r}; known: {sorted(_MODEL_NAMES)}")
    return detector_class(_MODEL_NAMES[name]).load(directory, device=device, **kwargs)
