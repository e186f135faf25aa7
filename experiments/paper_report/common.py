"""What the runner, the Markdown and the figures share: the grid's settings (`ReportConfig`), its result
(`ReportResult`), the experiment names, method labels, number formatting, `md_table`, and device / timing helpers.

`ReportConfig` holds only the grid's own settings; every detector setting (backbone, resize, patch size, seed,
SPADE's K, ...) comes from one validated `patchcore_core.config.DetectorParams` built from `base`.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from patchcore_core.artifacts import atomic_write
from patchcore_core.backbones import get_spec, hierarchy_layers
from patchcore_core.config import DEFAULTS, DetectorParams, validate_params
from patchcore_core.evaluation import markdown_table as md_table

__all__ = [
    "EXPERIMENTS", "GRID_OWNED", "LEGACY_NAMES", "ReportConfig", "ReportResult", "ratio_label", "levels_key",
    "pct", "num", "md_table", "device_name", "clock", "loadavg",
]

EXPERIMENTS = (
    "main",  # Table 1/S1 + 2/S2/S3: SPADE, PaDiM, PatchCore at the coreset ratios
    "subsampling",  # §4.4.2: greedy coreset vs random subsampling at the same ratios
    "search",  # §4.3: PatchCore-100% with exact (Flat) vs approximate (IVFPQ) search
    "timing",  # Table 5: seconds per image, end to end
    "reweighting",  # eq. 7 on/off at the coreset ratios
    "patch_size",  # neighbourhood P
    "layers",  # feature hierarchies
    "image_size",  # input resolution
    "lowshot",  # 1..50 nominal train images, all three methods
    "spade_layers",  # SPADE pyramid levels (SPADE paper Table 6)
)

# Detector settings the grid itself sets per variant: neither report settings nor allowed in `base`.
GRID_OWNED = {
    "method": "the report runs all three methods",
    "coreset_ratio": "set by the grid settings coreset_ratios / ablation_ratio / lowshot_ratio",
    "coreset_method": "greedy, and random in the 'subsampling' experiment",
    "index": "flat, and ivfpq in the 'search' experiment",
    "reweight_neighbors": "off in the main runs; eq. 7's b is the grid setting reweight_neighbors",
}
# Older names of detector settings, still accepted by `ReportConfig.updated` / `run_paper_report` and in
# results JSON written before the schema existed.
LEGACY_NAMES = {"spade_k": "k_images", "padim_features": "n_features"}
DEFAULT_BASE = {"backbone": "efficientnet_lite0"}
_TUPLES = ("coreset_ratios", "lowshot_sizes", "patch_sizes", "image_sizes", "experiments", "presets")
_NESTED_TUPLES = ("layer_sets", "spade_layer_sets")


@dataclass
class ReportConfig:
    """The experiment grid's own settings; the defaults are the paper's where one applies.

    `base` overrides `DetectorParams` defaults (validated with `validate_params`); `params` is the validated
    result, the one source of every detector setting. Settings the grid varies per variant (`GRID_OWNED`) are
    not allowed in `base`.
    """

    base: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_BASE))
    coreset_ratios: tuple[float, ...] = (0.25, 0.1, 0.01)
    heatmap_ratio: float = 0.1  # the PatchCore variant drawn in the overlays
    ablation_ratio: float = 0.01  # coreset ratio of the patch-size / layer / image-size ablations (Table S4: 1%)
    lowshot_ratio: float = 0.1
    lowshot_sizes: tuple[int, ...] = (1, 5, 10, 16, 50)
    patch_sizes: tuple[int, ...] = (1, 3, 5)
    layer_sets: tuple[tuple[int, ...], ...] = ((2,), (3,), (2, 3), (1, 2, 3))  # hierarchy levels
    image_sizes: tuple[int, ...] = (224, 280, 320)
    reweight_neighbors: int = 9  # b of the eq. 7 ablation (anomalib's value)
    spade_layer_sets: tuple[tuple[int, ...], ...] = ((3,), (2,), (1,), (1, 2, 3))
    timing_images: int = 16
    # Named presets (patchcore_core.config.PRESETS), each run end to end with its own settings beside the
    # report's base setting at 10 %: fit on the train image paths, predict the test paths (section 7).
    presets: tuple[str, ...] = ()
    heatmap_rows: int = 4
    experiments: tuple[str, ...] = EXPERIMENTS
    device: str = "auto"
    num_threads: int | None = None
    progress: bool = False
    params: DetectorParams = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _TUPLES:
            setattr(self, name, tuple(getattr(self, name)))
        for name in _NESTED_TUPLES:
            setattr(self, name, tuple(tuple(x) for x in getattr(self, name)))
        unknown = set(self.experiments) - set(EXPERIMENTS)
        if unknown:
            raise ValueError(f"unknown experiment(s) {sorted(unknown)}; choose from {list(EXPERIMENTS)}")
        if not self.coreset_ratios:
            raise ValueError("coreset_ratios must not be empty")
        from patchcore_core.config import PRESETS

        unknown_presets = [name for name in self.presets if name not in PRESETS]
        if unknown_presets:
            raise ValueError(f"unknown preset(s) {unknown_presets}; presets: {list(PRESETS)}")
        self.base = dict(self.base or {})
        owned = sorted(set(self.base) & set(GRID_OWNED))
        if owned:
            raise ValueError(f"base setting(s) {owned} are set by the report grid per variant: "
                             + "; ".join(f"{k}: {GRID_OWNED[k]}" for k in owned))
        self.params = validate_params(self.base)
        by_name = {name: level for level, name in self.hierarchy.items()}
        strays = [layer for layer in self.layer_names if layer not in by_name]
        if strays:
            raise ValueError(f"layers {strays} are not hierarchy levels of {self.params.backbone} "
                             f"({', '.join(f'{i} = {n}' for i, n in self.hierarchy.items())})")

    # ------------------------------------------------------------------ derived detector settings
    @property
    def hierarchy(self) -> dict[int, str]:
        """The backbone's layer names by hierarchy level 1..4."""
        return hierarchy_layers(self.params.backbone)

    @property
    def layer_names(self) -> tuple[str, ...]:
        """PatchCore's layers in the main runs: `params.layers`, or the backbone's default layers."""
        return tuple(self.params.layers or get_spec(self.params.backbone).default_layers)

    @property
    def levels(self) -> tuple[int, ...]:
        """The hierarchy levels of `layer_names` (the ablations' default layer set)."""
        by_name = {name: level for level, name in self.hierarchy.items()}
        return tuple(by_name[layer] for layer in self.layer_names)

    def resize_for(self, size: int) -> int | None:
        """The resize (shorter side) that goes with a crop size, keeping the base's resize / image size ratio."""
        if self.params.resize is None:
            return None
        return int(round(size * self.params.resize / self.params.image_size))

    # ------------------------------------------------------------------ construction
    @classmethod
    def grid_fields(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init and f.name != "base"]

    def updated(self, **settings: Any) -> ReportConfig:
        """A copy with grid settings and detector settings changed by name (detector names go into `base`).

        `base=` merges into the current base; the legacy names `spade_k` / `padim_features` mean `k_images` /
        `n_features`. Any other name raises `TypeError("unknown report setting(s) ...")`.
        """
        grid_names = set(self.grid_fields())
        detector_names = set(DetectorParams.model_fields) - set(GRID_OWNED)
        grid: dict[str, Any] = {}
        base = {**self.base, **(settings.pop("base", None) or {})}
        unknown = []
        for name, value in settings.items():
            if name in grid_names:
                grid[name] = value
            elif name in detector_names:
                base[name] = value
            elif name in LEGACY_NAMES:
                base[LEGACY_NAMES[name]] = value
            else:
                unknown.append(name)
        if unknown:
            raise TypeError(f"unknown report setting(s) {sorted(unknown)}; grid settings: {sorted(grid_names)}; "
                            f"detector settings: {sorted(detector_names | set(LEGACY_NAMES))}")
        current = {name: getattr(self, name) for name in grid_names}
        return ReportConfig(base=base, **{**current, **grid})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the grid settings, `base` as given, and the full validated detector settings."""
        out: dict[str, Any] = {"base": dict(self.base)}
        out.update({name: getattr(self, name) for name in self.grid_fields()})
        out["detector"] = self.params.model_dump()
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ReportConfig:
        """The config of a results JSON: `to_dict`'s layout, or the older flat one (detector settings beside
        the grid's, `spade_k` / `padim_features`, `layers` as hierarchy levels). Unknown keys are ignored."""
        raw = dict(raw)
        raw.pop("detector", None)
        base = dict(raw.pop("base", None) or {})
        grid_names = set(cls.grid_fields())
        grid = {}
        for name, value in raw.items():
            if name in grid_names:
                grid[name] = value
            elif name in LEGACY_NAMES:
                base.setdefault(LEGACY_NAMES[name], value)
            elif name in DetectorParams.model_fields and name not in GRID_OWNED:
                base.setdefault(name, value)
        layers = base.get("layers")
        if layers and all(isinstance(x, int) for x in layers):  # old layout: hierarchy levels
            names = hierarchy_layers(base.get("backbone", DEFAULTS.backbone))
            base["layers"] = [names[i] for i in layers]
        return cls(base=base, **grid)


@dataclass
class ReportResult:
    """What `run_paper_report` produced. `tables` are the report's tables as DataFrames (for artifacts)."""

    markdown: str
    report_path: Path
    figure_paths: list[Path]
    tables: dict[str, pd.DataFrame]
    rows: list[dict[str, Any]]
    wall_seconds: float
    device: str
    acceptance: dict[str, bool] = field(default_factory=dict)

    def write_tables(self, directory: str | os.PathLike) -> list[Path]:
        """Write every table as CSV under `directory` (e.g. for `mlflow.log_artifacts`)."""
        paths = []
        for name, table in self.tables.items():
            path = Path(directory) / f"{name}.csv"
            with atomic_write(path) as tmp:
                table.to_csv(tmp, index=False)
            paths.append(path)
        return paths


# ------------------------------------------------------------------------------------------------------------
# labels and formatting


def ratio_label(ratio: float) -> str:
    """The method label of a PatchCore coreset ratio: 0.1 -> 'PatchCore-10%'."""
    return f"PatchCore-{ratio * 100:g}%"


def levels_key(levels: Sequence[int]) -> str:
    """A hierarchy-level set as the paper writes it: (2,3), (3,)."""
    return "(" + ",".join(str(i) for i in levels) + (",)" if len(levels) == 1 else ")")


def pct(v: Any, digits: int = 2) -> str:
    """A fraction as a percentage with `digits` decimals; '–' for a missing value."""
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.{digits}f}"


def num(v: Any, fmt: str = "{:.4f}") -> str:
    """A float formatted with `fmt` (anything else as str); '–' for a missing value."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "–"
    return fmt.format(v) if isinstance(v, float | np.floating) else str(v)


# ------------------------------------------------------------------------------------------------------------
# devices and timing


def device_name(device: torch.device, threads: int) -> str:
    """A human-readable name of the compute device (GPU model, or CPU model with the thread count)."""
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model}, {threads} threads"


def clock(device: torch.device) -> float:
    """`time.perf_counter()` after the device's queued work finished (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def loadavg() -> float | None:
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None
