"""A backbone ensemble of PatchCore models (paper Table 4), normalised by NOMINAL statistics only.

Each member is a `PatchCore` with the shared settings `params` plus its own overrides (`members`, by default one
per EfficientNet-Lite backbone). Every member's image scores and anomaly maps are z-scored with the mean and
standard deviation of its own scores on nominal data, then averaged. Those statistics come from the train
images alone, leave-one-image-out: every `calibration_stride`-th train image is scored against the member's
memory bank with the bank rows that came from that same image excluded (the next nearest row from another
image is used), which is what scoring a held-out nominal image against a bank built without it would give
(up to the coreset selection). The official code instead min/max-normalises with the *test* set, which leaks
the test distribution and makes an image's score depend on the other images scored with it; here a score
depends only on the image and the fitted model.

Maps: the bilinear upsampling and the Gaussian blur preserve constants and are linear, so z-scoring a member's
map with its nominal patch-score statistics equals z-scoring its patch scores before upsampling.

scikit-learn contract as `PatchCore`: the constructor stores settings unchanged (`clone`/`set_params` work),
`fit` learns, `predict` scores, `save`/`load` write JSON + the members' own folders (no pickle).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator

from patchcore_core import __version__
from patchcore_core.artifacts import CONFIG_FILE, MODEL_FORMAT_VERSION, atomic_dir
from patchcore_core.config import validate_params
from patchcore_core.errors import IncompatibleModelError

__all__ = ["PatchCoreEnsemble", "nominal_statistics", "loo_patch_scores", "LITE_MEMBERS"]

MODEL_NAME = "PatchCoreEnsemble"
LITE_MEMBERS = ({"backbone": "efficientnet_lite0"}, {"backbone": "efficientnet_lite1"},
                {"backbone": "efficientnet_lite2"})
STAT_NAMES = ("image_mean", "image_std", "patch_mean", "patch_std")


def nominal_statistics(image_scores: np.ndarray, patch_scores: np.ndarray) -> np.ndarray:
    """[image mean, image std, patch mean, patch std] of nominal scores (std with ddof=1, floored at 1e-12)."""
    image_scores = np.asarray(image_scores, np.float64)
    patch_scores = np.asarray(patch_scores, np.float64).ravel()
    ddof = 1 if len(image_scores) > 1 else 0
    return np.array([image_scores.mean(), max(image_scores.std(ddof=ddof), 1e-12),
                     patch_scores.mean(), max(patch_scores.std(ddof=1), 1e-12)])


def loo_patch_scores(member, feats: np.ndarray, allowed: np.ndarray, neighbors: int = 16) -> np.ndarray:
    """Patch scores [M] of `feats` [M, D] as `member` scores them (mean distance to its `num_neighbors` nearest
    bank rows), using only bank rows where `allowed` [k] is true (the other train images' rows).

    The `neighbors` nearest rows are searched; when fewer than `num_neighbors` of them are allowed, the farthest
    ones searched stand in (a lower bound of the true distance)."""
    bank_size = len(member.memory_bank_)
    n_nn = max(1, member.num_neighbors)
    k = min(max(neighbors, n_nn + 1), bank_size)
    sq, ids = member.index_.search(feats, k)
    d = np.maximum(sq, 0.0)
    d = d if member.distance == "squared_l2" else np.sqrt(d)
    ok = allowed[ids]
    # the position of each allowed neighbour among the allowed ones; keep the first n_nn, pad with the last column
    rank = np.cumsum(ok, axis=1) - 1
    take = ok & (rank < n_nn)
    count = take.sum(axis=1)
    total = np.where(take, d, 0.0).sum(axis=1) + (n_nn - count) * d[:, -1]
    return (total / n_nn).astype(np.float64)


class PatchCoreEnsemble(BaseEstimator):
    """Average of z-scored PatchCore members (scores and maps), z-scored by leave-one-image-out train statistics.

    `params`: shared detector settings (a dict of `DetectorParams` names, may hold a `preset` key);
    `members`: per-member overrides (default: EfficientNet-Lite0/1/2); all members must share `image_size`.
    Fitted state: `members_` (fitted PatchCore models), `stats_` [n_members, 4] (`STAT_NAMES`).
    """

    def __init__(self, params: dict[str, Any] | None = None, members: tuple[dict[str, Any], ...] | None = None,
                 calibration_stride: int = 6, calibration_neighbors: int = 16, device: str = "auto",
                 num_threads: int | None = None, progress: bool = True) -> None:
        self.params = params
        self.members = members
        self.calibration_stride = calibration_stride
        self.calibration_neighbors = calibration_neighbors
        self.device = device
        self.num_threads = num_threads
        self.progress = progress

    # ------------------------------------------------------------------ settings
    def member_settings(self) -> list[dict[str, Any]]:
        """Each member's validated estimator settings (shared params, then its overrides)."""
        members = self.members if self.members is not None else LITE_MEMBERS
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if self.calibration_stride < 1 or self.calibration_neighbors < 2:
            raise ValueError("calibration_stride must be >= 1 and calibration_neighbors >= 2")
        out = [validate_params(dict(self.params or {}), **dict(m)).estimator_params() for m in members]
        sizes = {(s["image_size"], s["resize"]) for s in out}
        if len(sizes) != 1:
            raise ValueError(f"members must share image_size and resize (maps are averaged), got {sorted(sizes)}")
        return out

    def _member(self, settings: dict[str, Any]):
        from patchcore_core.model import PatchCore

        accepted = PatchCore._get_param_names()
        return PatchCore(**{k: v for k, v in settings.items() if k in accepted}, device=self.device,
                         num_threads=self.num_threads, progress=self.progress)

    @property
    def image_size(self) -> int:
        return self.member_settings()[0]["image_size"]

    # ------------------------------------------------------------------ fit
    def fit(self, images) -> PatchCoreEnsemble:
        """Fit every member on the nominal `images`, then its leave-one-image-out nominal statistics."""
        if len(images) == 0:
            raise ValueError("fit needs at least one image")
        settings = self.member_settings()
        members, stats = [], []
        for s in settings:
            member = self._member(s)
            member._prepare(images)
            feats, grid = [], None
            for f, batch_grid in member.iter_features(images, desc=f"fit {s['backbone']}: features"):
                feats.append(f)
                grid = batch_grid
            train = np.concatenate(feats)  # [n_images, h*w, D]
            del feats
            n_img, hw, dim = train.shape
            bank = train.reshape(-1, dim)
            selected = np.asarray(member.make_sampler().select(bank), np.int64)
            member.fit_memory_bank(bank[selected], grid, n_train_patches=len(bank))
            stats.append(self._loo_statistics(member, train, selected // hw))
            members.append(member)
            del train, bank
        self.members_ = members
        self.stats_ = np.stack(stats)
        return self

    def _loo_statistics(self, member, train: np.ndarray, source: np.ndarray) -> np.ndarray:
        """Nominal statistics of `member`: calibration train images scored without their own bank rows."""
        image_scores, patch_scores = [], []
        for i in range(0, len(train), self.calibration_stride):
            d = loo_patch_scores(member, train[i], source != i, self.calibration_neighbors)
            image_scores.append(d.max())
            patch_scores.append(d)
        return nominal_statistics(np.array(image_scores), np.concatenate(patch_scores))

    # ------------------------------------------------------------------ predict
    def check_fitted(self) -> None:
        if getattr(self, "members_", None) is None:
            raise RuntimeError("this PatchCoreEnsemble instance is not fitted yet: call fit() or load()")

    def combine(self, member_scores: list[np.ndarray], member_maps: list[np.ndarray] | None = None):
        """Average of the members' z-scored image scores (and maps), each with its own nominal statistics."""
        self.check_fitted()
        st = self.stats_
        scores = np.mean([(s - st[i, 0]) / st[i, 1] for i, s in enumerate(member_scores)], axis=0)
        if member_maps is None:
            return scores.astype(np.float32)
        maps = np.zeros_like(member_maps[0], dtype=np.float64)
        for i, m in enumerate(member_maps):
            maps += (m - st[i, 2]) / st[i, 3]
        return scores.astype(np.float32), (maps / len(member_maps)).astype(np.float32)

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Image scores [N] and anomaly maps [N, S, S]: z-scored member outputs averaged (float32)."""
        self.check_fitted()
        if not isinstance(images, torch.Tensor):
            from patchcore_core.data import load_images

            images = load_images([str(p) for p in images], resize=self.members_[0].resize,
                                 image_size=self.members_[0].image_size, num_workers=2)
        outputs = [m.predict(images) for m in self.members_]
        return self.combine([o[0] for o in outputs], [o[1] for o in outputs])

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """config.json (settings + statistics as exact float64 hex) and one PatchCore folder per member."""
        self.check_fitted()
        directory = Path(directory)
        config = {"format_version": MODEL_FORMAT_VERSION, "library_version": __version__, "model": MODEL_NAME,
                  "params": {"params": dict(self.params or {}),
                             "members": [dict(m) for m in (self.members if self.members is not None
                                                           else LITE_MEMBERS)],
                             "calibration_stride": self.calibration_stride,
                             "calibration_neighbors": self.calibration_neighbors},
                  "state": {"stat_names": list(STAT_NAMES),
                            "stats": [[float(x).hex() for x in row] for row in self.stats_],
                            "member_dirs": [f"member_{i}" for i in range(len(self.members_))]}}
        with atomic_dir(directory) as tmp:
            for i, member in enumerate(self.members_):
                member.save(tmp / f"member_{i}")
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | None = None) -> PatchCoreEnsemble:
        from patchcore_core.model import PatchCore

        directory = Path(directory)
        path = directory / CONFIG_FILE
        if not path.is_file():
            raise IncompatibleModelError(f"{directory} is not a saved ensemble: {CONFIG_FILE} is missing")
        config = json.loads(path.read_text())
        if config.get("model") != MODEL_NAME:
            raise IncompatibleModelError(f"{directory} holds a {config.get('model')!r} model, not {MODEL_NAME}")
        if config.get("format_version") != MODEL_FORMAT_VERSION:
            raise IncompatibleModelError(f"{directory}: format {config.get('format_version')}, "
                                         f"this library reads {MODEL_FORMAT_VERSION}")
        p = config["params"]
        model = cls(params=p["params"], members=tuple(p["members"]), calibration_stride=p["calibration_stride"],
                    calibration_neighbors=p["calibration_neighbors"], device=device or "auto")
        state = config["state"]
        model.members_ = [PatchCore.load(directory / d, device=device) for d in state["member_dirs"]]
        model.stats_ = np.array([[float.fromhex(x) for x in row] for row in state["stats"]])
        return model
