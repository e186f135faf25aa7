"""Named presets (`--preset`, `validate_params(preset=...)`, a flow config's `preset` key) resolve to exact values."""

from __future__ import annotations

import argparse

import pytest

from patchcore_core.config import DEFAULTS, PRESETS, DetectorParams, add_cli_options, from_cli, validate_params
from patchcore_core.errors import ConfigError

PAPER = dict(method="patchcore", backbone="wide_resnet50_2", layers=["layer2", "layer3"], patch_size=3,
             pretrain_dim=1024, target_dim=1024, resize=256, image_size=224, coreset_ratio=0.1,
             coreset_method="greedy", projection_dim=128, index="flat", num_neighbors=1, reweight_neighbors=0,
             distance="l2")
OFFLINE = dict(method="patchcore", backbone="efficientnet_lite1", layers=["blocks.1", "blocks.2", "blocks.4"],
               patch_size=3, pretrain_dim=112, target_dim=224, resize=366, image_size=320, coreset_ratio=0.01,
               coreset_method="greedy", projection_dim=128, index="flat", num_neighbors=3, reweight_neighbors=0,
               distance="l2")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    return parser


@pytest.mark.parametrize(("name", "expected"), [("paper", PAPER), ("offline", OFFLINE)])
def test_preset_resolves_through_from_cli_and_validate_params_to_exact_values(name, expected):
    via_cli = from_cli(_parser().parse_args(["--preset", name]))
    via_validate = validate_params(preset=name)
    via_key = DetectorParams(preset=name)  # a flow's config={"preset": ...}
    for params in (via_cli, via_validate, via_key):
        assert {k: getattr(params, k) for k in expected} == expected
        untouched = set(DetectorParams.model_fields) - set(expected)
        assert {k: getattr(params, k) for k in untouched} == {k: getattr(DEFAULTS, k) for k in untouched}
    assert via_cli == via_validate == via_key


def test_explicit_flag_overrides_a_preset_value_and_the_preset_overrides_base():
    args = _parser().parse_args(["--preset", "offline", "--coreset-ratio", "0.25", "--image-size", "224"])
    params = from_cli(args, base={"backbone": "resnet18", "seed": 3})
    assert params.coreset_ratio == 0.25 and params.image_size == 224  # flags win over the preset
    assert params.backbone == OFFLINE["backbone"]  # the preset wins over base
    assert params.seed == 3  # base still fills what the preset does not set
    assert validate_params(preset="offline", coreset_ratio=0.25).coreset_ratio == 0.25
    assert DetectorParams(preset="paper", coreset_ratio=0.01).coreset_ratio == 0.01
    assert from_cli(_parser().parse_args([])) == DEFAULTS  # no preset: the schema defaults (WideResNet-50)
    assert DEFAULTS.backbone == "wide_resnet50_2"


def test_unknown_preset_is_one_line_naming_the_presets():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; presets: paper, offline, fast"):
        validate_params(preset="nope")
    with pytest.raises(SystemExit):  # argparse refuses names outside the table
        _parser().parse_args(["--preset", "nope"])
    assert list(PRESETS) == ["paper", "offline", "fast"]


def test_presets_do_not_leak_mutable_values():
    params = validate_params(preset="paper")
    params.layers.append("layer4")
    assert PRESETS["paper"]["layers"] == ["layer2", "layer3"]


def test_a_deployment_can_name_a_preset():
    """Prefect checks a deployment run's parameters against the flow's JSON schema before the run starts: the
    input-only `preset` key must pass there, and an unknown preset must not."""
    import jsonschema
    from prefect.utilities.callables import parameter_schema

    from flows.patchcore import patchcore

    schema = parameter_schema(patchcore.fn).model_dump_for_openapi()
    jsonschema.validate({"config": {"preset": "offline", "coreset_ratio": 0.05}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"config": {"preset": "nope"}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"config": {"indices": ["flat"]}}, schema)
