"""The score-batch flow for real: a model registered in MLflow (SQLite), images on the SeaweedFS S3 server,
results written back to the bucket; idempotent by content, per-file errors as rows, an MLflow scoring run."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

pytestmark = pytest.mark.usefixtures("prefect_harness")

SMALL = dict(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4)


@pytest.fixture
def champion(pipeline_env, pipeline_dataset, tmp_path):
    """A PatchCore fitted on brick's train images, registered as patchcore-brick v1 with alias champion."""
    import mlflow

    from patchcore_core.data import list_category
    from patchcore_core.model import PatchCore
    from serving import PYFUNC_ARTIFACTS, PYFUNC_CODE
    from tasks.tracking import client_for, model_signature

    listing = list_category(str(pipeline_dataset), "brick")
    model = PatchCore(**SMALL, device="cpu", progress=False).fit([s.path for s in listing.train])
    model.save(tmp_path / "model")
    (tmp_path / "serving.json").write_text(json.dumps({"threshold": model.threshold_}))
    client = client_for(pipeline_env["work_dir"])
    experiment = client.create_experiment("registry-fixture", (tmp_path / "art").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE), signature=model_signature(0.0),
                                artifacts={**{k: str(tmp_path / "model" / n) for k, n in PYFUNC_ARTIFACTS.items()},
                                           "serving": str(tmp_path / "serving.json")},
                                pip_requirements=[], registered_model_name="patchcore-brick")
    client.set_registered_model_alias("patchcore-brick", "champion", "1")
    return model


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (90, 90, 90)).save(buf, "PNG")
    return buf.getvalue()


def test_score_batch_scores_new_images_once_and_reports_bad_files(pipeline_env, s3_server, pipeline_dataset,
                                                                   champion):
    from mlflow import MlflowClient

    from flows.score_batch import score_batch

    fs = s3_server._client()
    s3_server.create_bucket("incoming")
    s3_server.create_bucket("results")
    good = sorted((pipeline_dataset / "brick" / "test").rglob("*.png"))
    for i, path in enumerate(good):
        fs.pipe(f"incoming/line-a/lot {i // 3}/{path.parent.name}-{path.name}", path.read_bytes())
    fs.pipe("incoming/line-a/bad.png", b"not an image at all")
    fs.pipe("incoming/line-a/dot.png", _png((1, 1)))
    work = str(pipeline_env["work_dir"])

    first = score_batch(images_url="s3://incoming/line-a", results_url="s3://results/brick", category="brick",
                        shard_size=3, work_dir=work)
    assert first["n_images"] == len(good) + 2 and first["n_scored"] == len(good) and first["n_errors"] == 2
    assert first["model"] == "patchcore-brick v1"
    with fs.open("results/brick/predictions.parquet", "rb") as fh:
        table = pd.read_parquet(fh)
    assert len(table) == len(good) + 2
    errors = table[table.error.notna()].set_index("key")["error"]
    assert set(errors.index) == {"bad.png", "dot.png"} and "1x1 px" in errors["dot.png"]
    assert "shard-" not in " ".join(errors)  # errors name the bucket key, not a local copy
    scored = table[table.error.isna()]
    assert (scored.threshold == champion.threshold_).all()
    assert (scored.is_anomalous == (scored.score >= champion.threshold_)).all()
    assert first["anomaly_rate"] == pytest.approx(scored.is_anomalous.mean())
    # The same scores as the library on the same bytes.
    expected = dict(zip([f"{p.parent.name}-{p.name}" for p in good], champion.predict([str(p) for p in good])[0],
                        strict=True))
    np.testing.assert_array_equal(scored.score.to_numpy(np.float32),
                                  np.array([expected[k.rsplit("/", 1)[-1]] for k in scored.key], np.float32))
    masks = fs.ls("results/brick/masks")
    assert len(masks) == len(good) and len(fs.ls("results/brick/heatmaps")) == len(good)
    assert any("lot_0__" in m or "lot 0__" in m or "lot_0" in m for m in masks)

    # Idempotent: nothing new, nothing scored again; a new image alone is scored.
    again = score_batch(images_url="s3://incoming/line-a", results_url="s3://results/brick", category="brick",
                        shard_size=3, work_dir=work)
    assert again["n_scored"] == 0 and again["n_already_scored"] == len(good)
    fs.pipe("incoming/line-a/lot 9/new.png", good[0].read_bytes()[:-1] + good[0].read_bytes()[-1:])  # same bytes
    fs.pipe("incoming/line-a/lot 9/other.png", (pipeline_dataset / "brick" / "train" / "good" / "000.png")
            .read_bytes())
    third = score_batch(images_url="s3://incoming/line-a", results_url="s3://results/brick", category="brick",
                        shard_size=3, work_dir=work)
    assert third["n_scored"] == 1 and third["n_already_scored"] == len(good) + 1  # same content: skipped

    client = MlflowClient(pipeline_env["tracking_uri"])
    exp = client.get_experiment_by_name("patchcore-scoring")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.data.metrics["n_scored"] for r in runs] == [len(good), 0, 1]
    assert runs[0].data.tags["model_version"] == "patchcore-brick/1" and runs[0].info.status == "FINISHED"

    # The deployment's form: the patchcore flow in mode score-batch (nothing new to score now).
    from flows.patchcore import patchcore

    fourth = patchcore(mode="score-batch", data_url="s3://incoming/line-a", results_url="s3://results/brick",
                       categories=["brick"], work_dir=work)
    assert fourth["n_scored"] == 0 and fourth["n_already_scored"] == len(good) + 2


def test_score_batch_refuses_a_bad_model_uri(pipeline_env):
    from flows.score_batch import score_batch
    from patchcore_core.errors import ConfigError

    with pytest.raises(ConfigError, match="setting model_uri"):
        score_batch(images_url="/x", results_url="/y", model_uri="runs:/abc/model", work_dir=str(
            pipeline_env["work_dir"]))
