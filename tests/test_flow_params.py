"""Flow parameters a worker validates without warnings (a parameter named like a BaseModel attribute, such as
`register`, made pydantic warn in every worker log)."""

from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("name", ["patchcore", "full_benchmark", "benchmark_category", "nightly_retrain",
                                  "retrain_category", "paper_report"])
def test_flow_parameter_schema_has_no_warnings(name):
    from prefect.utilities.callables import parameter_schema

    import flows.patchcore as flows

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = parameter_schema(getattr(flows, name).fn)
    assert "register" not in schema.properties
