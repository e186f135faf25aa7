"""Typed inputs and outputs of the pipeline stages: small configs and URIs only, never arrays.

Every output model is what one task returns and what the next task takes; Prefect stores it as JSON in the
task's cache record, so a rerun can skip the stage and hand the same URIs on.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

IndexKind = Literal["flat", "ivfpq"]


class ModelConfig(BaseModel):
    """The PatchCore settings a run uses (`patchcore_core.PatchCore` arguments; runtime ones come from settings).

    `indices` lists the faiss indices to build; the first one scores the test split and is registered.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["patchcore", "spade", "padim"] = "patchcore"  # the baselines skip the coreset/index stages
    backbone: str = "wide_resnet50_2"
    layers: list[str] | None = None
    weights: str | None = None
    patch_size: int = 3
    pretrain_dim: int | None = None
    target_dim: int | None = None
    coreset_ratio: float = Field(0.1, gt=0, le=1)
    coreset_method: Literal["greedy", "random", "none"] = "greedy"
    projection_dim: int = 128
    num_neighbors: int = 1
    reweight_neighbors: int = 0
    distance: Literal["l2", "squared_l2"] = "l2"
    resize: int | None = 256
    image_size: int = 224
    indices: list[IndexKind] = Field(default_factory=lambda: ["flat"], min_length=1)
    seed: int = 0
    batch_size: int = 16

    def patchcore_params(self) -> dict[str, Any]:
        """Keyword arguments for `PatchCore(...)` (without device/threads/progress)."""
        params = self.model_dump(exclude={"indices", "method"})
        params["index"] = self.indices[0]
        return params


class FetchedCategory(BaseModel):
    """One category mirrored into the local cache (MVTec layout under `root_uri`) and its checksum manifest."""

    source_url: str
    category: str
    root_uri: str
    manifest_uri: str
    digest: str
    n_files: int
    n_train: int
    n_test: int
    n_anomalous: int


class SplitShards(BaseModel):
    """Parquet shards of one split's patch features, in image order."""

    shard_uris: list[str]
    n_images: int
    patches_per_image: int
    dim: int
    grid: list[int]
    fingerprint: str
    n_reused: int = 0
    n_written: int = 0


class ExtractedFeatures(BaseModel):
    """Patch features of a category: `features_root_uri` is the hive-partitioned dataset root."""

    category: str
    features_root_uri: str
    splits: dict[str, SplitShards]


class CoresetSelection(BaseModel):
    """The coreset (memory bank) as Parquet: global_index, image_index, patch_index, embedding."""

    category: str
    coreset_uri: str
    n_train_patches: int
    n_selected: int
    dim: int
    grid: list[int]
    fingerprint: str
    seconds: float = 0.0


class TrainedModel(BaseModel):
    """Saved PatchCore model folders (config.json + memory_bank.npy + index.faiss), one per faiss index kind."""

    category: str
    model_uri: str
    model_uris: dict[str, str]
    primary_index: str
    fingerprint: str
    params: dict[str, Any]


class SplitScores(BaseModel):
    """Test-split scores: predictions.parquet, anomaly_maps.npy, gt_masks.npy."""

    category: str
    predictions_uri: str
    maps_uri: str
    masks_uri: str
    n_images: int
    fingerprint: str
    seconds_per_image: float = 0.0


class EvaluationResult(BaseModel):
    """The `patchcore_core.metrics` set of one category, and the figures."""

    category: str
    metrics: dict[str, Any]
    metrics_uri: str
    figure_uris: dict[str, str]


class CategoryRun(BaseModel):
    """Everything one category's pipeline produced, as the per-category subflow returns it."""

    category: str
    fetched: FetchedCategory
    model: TrainedModel
    scores: SplitScores
    evaluation: EvaluationResult
    mlflow_run_id: str | None = None
    registered_model: str | None = None
    registered_version: str | None = None
