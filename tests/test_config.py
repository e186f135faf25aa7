"""The one parameter schema: groups, validation messages, and the CLI flags derived from it."""

from __future__ import annotations

import argparse

import pytest

from patchcore_core.config import DEFAULTS, STAGE_GROUPS, DetectorParams, add_cli_options, from_cli, stage_of
from patchcore_core.errors import ConfigError


def test_every_setting_belongs_to_one_known_group():
    assert {stage_of(name) for name in DetectorParams.model_fields} == set(STAGE_GROUPS)
    groups = [DEFAULTS.stage_params(g) for g in STAGE_GROUPS]
    assert sum(len(g) for g in groups) == len(DetectorParams.model_fields)  # a partition: no setting in two
    assert set(DEFAULTS.stage_params("features")) >= {"backbone", "layers", "patch_size", "image_size", "resize"}
    assert set(DEFAULTS.stage_params("coreset")) == {"coreset_ratio", "coreset_method", "projection_dim", "seed"}
    with pytest.raises(ValueError, match="unknown stage group"):
        DEFAULTS.stage_params("nope")


@pytest.mark.parametrize(("flags", "message"), [
    (["--coreset-ratio", "0"], "setting coreset_ratio: Input should be greater than 0 (got 0.0)"),
    (["--coreset-ratio", "nan"], "setting coreset_ratio: must be a finite number in (0, 1] (got nan)"),
    (["--coreset-ratio", "1.5"], "setting coreset_ratio: Input should be less than or equal to 1 (got 1.5)"),
    (["--patch-size", "4"], "setting patch_size: must be odd"),
    (["--batch-size", "0"], "setting batch_size: Input should be greater than or equal to 1"),
    (["--image-size", "7"], "setting image_size: Input should be greater than or equal to 32"),
    (["--layers", ","], "setting layers: must name at least one layer"),
])
def test_cli_flags_are_validated_by_the_schema_with_one_line_naming_the_setting(flags, message):
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    with pytest.raises(ConfigError) as err:
        from_cli(parser.parse_args(flags))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_cli_flags_parse_types_lists_and_none_and_keep_unset_defaults():
    parser = argparse.ArgumentParser()
    add_cli_options(parser)
    params = from_cli(parser.parse_args(["--layers", "blocks.1,blocks.2", "--resize", "none", "--index", "ivfpq",
                                         "--coreset-ratio", "0.25"]))
    assert params.layers == ["blocks.1", "blocks.2"] and params.resize is None and params.index == "ivfpq"
    assert params.coreset_ratio == 0.25 and params.backbone == DEFAULTS.backbone
    assert from_cli(parser.parse_args([]), base={"backbone": "resnet18"}).backbone == "resnet18"
    with pytest.raises(SystemExit):  # argparse itself refuses a value outside a Literal's choices
        parser.parse_args(["--distance", "cosine"])


def test_unknown_setting_is_refused_by_name():
    from patchcore_core.config import validate_params

    with pytest.raises(ConfigError, match="unknown setting 'coreset_ratios'"):
        validate_params({"coreset_ratios": [0.1]})
