"""`method` as a flow parameter: full-benchmark runs SPADE / PaDiM through the same fetch, metrics and MLflow."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.mark.parametrize("method", ["padim", "spade"])
def test_full_benchmark_with_a_baseline_method(pipeline_env, pipeline_dataset, method):
    from flows.patchcore import patchcore
    from patchcore_core.baselines import make_detector
    from patchcore_core.config import DetectorParams
    from patchcore_core.data import list_category

    config = DetectorParams(method=method, backbone="efficientnet_lite0", image_size=64, resize=80, batch_size=4)
    runs = patchcore(mode="full-benchmark", data_url=str(pipeline_dataset), categories=["brick"], config=config,
                     work_dir=str(pipeline_env["work_dir"]))
    (run,) = runs
    assert run.registered_model is None  # the registry holds PatchCore models only
    metrics = json.loads(open(run.evaluation.metrics_path).read())
    assert 0.0 <= metrics["image_auroc"] <= 1.0 and metrics["au_pro"] is not None
    client = mlflow.MlflowClient(tracking_uri=pipeline_env["tracking_uri"])
    logged = client.get_run(run.mlflow_run_id)
    assert logged.data.params["method"] == method
    assert {"model", "figures", "evaluation"} <= {a.path for a in client.list_artifacts(run.mlflow_run_id)}
    # The flow's scores equal the library's fit/predict with the same settings.
    listing = list_category(str(pipeline_dataset), "brick")
    reference = make_detector(method, strict=False, **config.estimator_params(), device="cpu", progress=False)
    expected, _ = reference.fit([s.path for s in listing.train]).predict([s.path for s in listing.test])
    import pandas as pd

    got = pd.read_parquet(run.scores.predictions).score.to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
