"""Pipeline library pieces without Prefect: shards, fetch (from a real S3 server), stages == PatchCore.fit/predict."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from patchcore_core import shards
from patchcore_core.errors import DataError
from patchcore_core.overlays import plot_overlays, select_cases
from patchcore_core.stages.fetch import fetch_category, read_manifest, source_slug, verify_cache

os.environ.setdefault("PATCHCORE_THREADS", "1")

SMALL = dict(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4, seed=0)


# ------------------------------------------------------------------------------------------------ shards


def test_shards_round_trip_zero_copy_and_hive_partitions(tmp_path):
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((10, 16, 24)).astype(np.float32)
    path = shards.shard_path(tmp_path, "brick", "train", 0)
    info = shards.write_shard(path, feats, first_image=0, metadata={"fingerprint": "abc", "grid": [4, 4]},
                              images_per_row_group=4)
    assert info.n_rows == 160 and path.name == "part-00000.parquet"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")], "temporary file left behind"
    pf = pq.ParquetFile(path)
    assert pf.num_row_groups == 3 and pf.metadata.row_group(0).num_rows == 4 * 16
    assert str(pf.schema_arrow.field("embedding").type) == "fixed_size_list<element: float not null>[24]"
    assert shards.read_shard_metadata(path)["grid"] == [4, 4]
    assert shards.shard_is_complete(path, "abc") and not shards.shard_is_complete(path, "other")

    batches = list(shards.iter_image_batches([path]))
    assert [b[0].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    first = batches[0][1]
    assert first.shape == (4, 16, 24) and not first.flags.writeable  # a view on Arrow memory, not a copy
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), feats)
    np.testing.assert_array_equal(shards.read_embeddings([path]), feats.reshape(-1, 24))

    shards.write_shard(shards.shard_path(tmp_path, "gravel", "test", 0), feats[:2], 0, {"fingerprint": "x"})
    table = shards.open_dataset(tmp_path).to_table(columns=["category", "split", "image_index"])
    assert sorted(set(zip(table["category"].to_pylist(), table["split"].to_pylist(), strict=True))) == [
        ("brick", "train"), ("gravel", "test")]


def test_truncated_shard_is_not_complete(tmp_path):
    path = shards.shard_path(tmp_path, "c", "train", 0)
    shards.write_shard(path, np.zeros((2, 4, 8), np.float32), 0, {"fingerprint": "f"})
    path.write_bytes(path.read_bytes()[:100])
    assert not shards.shard_is_complete(path, "f")


# ------------------------------------------------------------------------------------------------ overlays


def test_select_cases_and_overlay_figure(tmp_path):
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.2, 0.3, 0.8, 0.95])
    cases = select_cases(labels, scores, k=1)
    assert cases == {"worst": [3, 1], "best": [5, 0]}
    maps = np.random.default_rng(0).random((2, 32, 32)).astype(np.float32)
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, 8:16, 8:16] = 1
    out = plot_overlays(np.random.default_rng(1).random((2, 3, 32, 32)), maps, masks, ["a", "b"],
                        tmp_path / "o.png")
    assert out.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------------------------------------ fetch


def test_fetch_from_s3_manifest_incremental_and_errors(s3_server, s3_dataset, pipeline_dataset, tmp_path):
    opts = s3_server.storage_options
    cache = tmp_path / "cache"
    result = fetch_category(s3_dataset, "brick", cache, opts)
    assert result.n_train == 8 and result.n_test == 6 and result.n_anomalous == 3
    assert result.n_copied == result.n_files == 8 + 6 + 3  # train, test, masks
    manifest = read_manifest(result.manifest)
    import hashlib

    rel = "train/good/000.png"
    assert manifest[rel]["sha256"] == hashlib.sha256((pipeline_dataset / "brick" / rel).read_bytes()).hexdigest()
    assert verify_cache(result.manifest, cache, "brick") == []

    again = fetch_category(s3_dataset, "brick", cache, opts)
    assert again.n_copied == 0 and again.digest == result.digest

    # A changed object at the source is copied again and changes the data digest.
    fs = s3_server._client()
    key = s3_dataset.removeprefix("s3://") + "/brick/train/good/001.png"
    original = fs.cat(key)
    fs.pipe(key, (pipeline_dataset / "brick" / "train" / "good" / "002.png").read_bytes())
    try:
        changed = fetch_category(s3_dataset, "brick", cache, opts)
        assert changed.n_copied == 1 and changed.digest != result.digest
    finally:
        fs.pipe(key, original)

    with pytest.raises(DataError, match="categories found: \\['brick', 'gravel'\\]"):
        fetch_category(s3_dataset, "nope", cache, opts)
    with pytest.raises(DataError, match="cannot list"):
        fetch_category(s3_dataset, "brick", cache, dict(opts, secret="wrong-secret"))


def test_s3_server_takes_a_write_in_every_new_bucket(s3_server):
    """Each bucket takes a SeaweedFS volume of its own; the local server must not size its volume count from the
    free disk (CI failed a PutObject with InternalError on its third bucket when the disk had little room)."""
    fs = s3_server._client()
    buckets = [f"many-buckets-{i:02d}" for i in range(24)]
    try:
        for bucket in buckets:
            s3_server.create_bucket(bucket)
            fs.pipe(f"{bucket}/probe.txt", bucket.encode())
        assert [fs.cat(f"{bucket}/probe.txt") for bucket in buckets] == [b.encode() for b in buckets]
    finally:
        for bucket in buckets:
            if fs.exists(bucket):
                fs.rm(bucket, recursive=True)


def test_fetch_local_path_and_layout_validation(pipeline_dataset, tmp_path):
    result = fetch_category(str(pipeline_dataset), "gravel", tmp_path / "cache")
    assert result.n_files == 17
    assert source_slug(str(pipeline_dataset)) == source_slug("file://" + str(pipeline_dataset))
    broken = tmp_path / "broken"
    (broken / "cat" / "train" / "good").mkdir(parents=True)
    (broken / "cat" / "test" / "crack").mkdir(parents=True)
    src = pipeline_dataset / "gravel"
    (broken / "cat" / "train" / "good" / "a.png").write_bytes((src / "train/good/000.png").read_bytes())
    (broken / "cat" / "test" / "crack" / "a.png").write_bytes((src / "train/good/001.png").read_bytes())
    with pytest.raises(DataError, match="no ground-truth mask"):
        fetch_category(str(broken), "cat", tmp_path / "cache2")


# ------------------------------------------------------------------------------------------------ stages


def test_stages_equal_patchcore_fit_predict(pipeline_dataset, tmp_path):
    """extract → coreset → index → score over Parquet shards gives exactly PatchCore.fit/predict."""
    from patchcore_core.config import DetectorParams
    from patchcore_core.data import list_category
    from patchcore_core.model import PatchCore
    from patchcore_core.runtime import Runtime
    from patchcore_core.stages import calibrate, coreset, extract, fetch, index, metrics, score

    work = tmp_path / "work"
    fetched = fetch.run(str(pipeline_dataset), "brick", work)
    params = DetectorParams(**{k: v for k, v in SMALL.items()})
    cpu = Runtime(device="cpu")
    train = extract.run(fetched, params, "train", work, cpu, images_per_shard=3, images_per_row_group=2)
    test = extract.run(fetched, params, "test", work, cpu, images_per_shard=3, images_per_row_group=2)
    assert len(train.shards) == 3 and train.n_written == 3  # 8 images in shards of 3
    selected = coreset.run(train, params, work, cpu)
    assert selected.n_train_patches == 8 * 64 and selected.n_selected == int(8 * 64 * 0.25)
    calibration = calibrate.run(train, params, work, cpu)
    model = index.run(selected, params, work, cpu, calibration=calibration)
    scored = score.run(model, test, fetched, work, cpu)

    listing = list_category(fetched.root, "brick")
    reference = PatchCore(**SMALL, device="cpu", progress=False).fit([s.path for s in listing.train])
    ref_scores, ref_maps = reference.predict([s.path for s in listing.test])
    import pandas as pd

    loaded = PatchCore.load(model.model_dir)
    np.testing.assert_array_equal(reference.memory_bank_, loaded.memory_bank_)
    # The thresholds too: the same held-out train images, the same calibration bank, the same quantiles.
    assert calibration.calibration["n_holdout_images"] == 4 and reference.calibration_ == loaded.calibration_
    assert loaded.threshold_ == reference.threshold_ and loaded.pixel_threshold_ == reference.pixel_threshold_
    preds = pd.read_parquet(scored.predictions)
    assert list(preds.columns) == list(score.PREDICTION_COLUMNS)
    np.testing.assert_array_equal(preds["score"].to_numpy(), ref_scores)
    np.testing.assert_array_equal(np.load(scored.maps), ref_maps)

    evaluated = metrics.run(scored, fetched, model, work)
    assert set(evaluated.figures) == {"roc_pr", "pro_curve", "overlays_worst", "overlays_best"}
    saved = json.loads(open(evaluated.metrics_path).read())
    assert {"image_auroc", "pixel_auroc", "au_pro", "f1_threshold"} <= set(saved) and saved["f1_is_oracle"]
    assert saved["operating_point"]["threshold"] == reference.threshold_
    assert {"fpr", "tpr", "precision", "pixel_fpr", "pixel_tpr"} <= set(saved["operating_point"])

    # Every result is JSON: what a task returns and the next one takes.
    assert type(scored).model_validate_json(scored.model_dump_json()) == scored

    # A second call reuses every stage's output instead of recomputing it.
    again = extract.run(fetched, params, "train", work, cpu, images_per_shard=3, images_per_row_group=2)
    assert again.n_reused == 3 and again.n_written == 0
    assert coreset.run(train, params, work).seconds == selected.seconds
    # A run killed in the middle of extraction: one shard and the marker missing. Only that shard is redone.
    before = shards.read_embeddings(train.shards)
    Path(train.shards[1]).unlink()
    (Path(train.shards[1]).parent / "_SUCCESS.json").unlink()
    resumed = extract.run(fetched, params, "train", work, cpu, images_per_shard=3, images_per_row_group=2)
    assert resumed.n_reused == 2 and resumed.n_written == 1
    np.testing.assert_array_equal(shards.read_embeddings(resumed.shards), before)
    # An output deleted by hand is recomputed, not trusted from the stage's marker, and nothing else is.
    Path(selected.path).unlink()
    redone = coreset.run(resumed, params, work, cpu)
    assert Path(redone.path).is_file() and redone.n_selected == selected.n_selected


def test_stage_fingerprints_follow_their_settings_group(pipeline_dataset, tmp_path):
    """A feature setting changes the shards; a model setting reuses shards and coreset but makes a new model."""
    from patchcore_core.config import DetectorParams
    from patchcore_core.stages import coreset, extract, fetch, index

    work = tmp_path / "work"
    fetched = fetch.run(str(pipeline_dataset), "gravel", work)
    base = DetectorParams(**SMALL)
    train = extract.run(fetched, base, "train", work)
    selected = coreset.run(train, base, work)
    model = index.run(selected, base, work)

    knn = base.model_copy(update={"num_neighbors": 3})
    assert extract.run(fetched, knn, "train", work).n_written == 0
    assert coreset.run(extract.run(fetched, knn, "train", work), knn, work).fingerprint == selected.fingerprint
    assert index.run(selected, knn, work).fingerprint != model.fingerprint

    patch = base.model_copy(update={"patch_size": 1})
    moved = extract.run(fetched, patch, "train", work)
    assert moved.fingerprint != train.fingerprint and moved.n_written == len(moved.shards)


# ------------------------------------------------------------------------------------------------ coreset


@pytest.mark.parametrize("dim", [24, 200])  # below and above projection_dim
def test_coreset_over_shards_equals_sampler_on_full_bank(tmp_path, dim):
    from patchcore_core.sampler import make_sampler
    from patchcore_core.stages.coreset import gather_rows, select_from_shards

    rng = np.random.default_rng(1)
    feats = rng.standard_normal((9, 16, dim)).astype(np.float32)
    paths = []
    for i, first in enumerate(range(0, 9, 4)):  # shards of 4, 4, 1 images; row groups of 2 images
        path = shards.shard_path(tmp_path, "c", "train", i)
        shards.write_shard(path, feats[first : first + 4], first, {"fingerprint": "f"}, images_per_row_group=2)
        paths.append(path)
    bank = feats.reshape(-1, dim)
    config = {"coreset_method": "greedy", "coreset_ratio": 0.1, "projection_dim": 128, "seed": 3}
    selected, memory, info = select_from_shards(paths, config, device="cpu")
    expected = make_sampler("greedy", 0.1, projection_dim=128, seed=3, device="cpu", progress=False).select(bank)
    np.testing.assert_array_equal(selected, expected)
    np.testing.assert_array_equal(memory, bank[expected])
    assert info["projected_dim"] == min(dim, 128)
    np.testing.assert_array_equal(gather_rows(paths, [5, 0, 143]), bank[[5, 0, 143]])
    for method in ("random", "none"):
        sel, mem, _ = select_from_shards(paths, dict(config, coreset_method=method), device="cpu")
        ref = make_sampler(method, 0.1, seed=3).select(bank)
        np.testing.assert_array_equal(sel, ref)
        np.testing.assert_array_equal(mem, bank[ref])


# ------------------------------------------------------------------------------------------------ task helpers


def test_retry_only_on_transient_io_errors():
    from tasks.common import is_transient_io_error

    assert is_transient_io_error(ConnectionResetError())
    assert is_transient_io_error(TimeoutError())
    try:
        try:
            raise ConnectionRefusedError("endpoint down")
        except OSError as exc:
            raise DataError("cannot list s3://b/p/c") from exc
    except DataError as wrapped:
        assert is_transient_io_error(wrapped)
    assert not is_transient_io_error(DataError("category 'x' not found"))
    assert not is_transient_io_error(FileNotFoundError("missing"))
    assert not is_transient_io_error(ValueError("bad setting"))


def test_promotion_rule():
    from patchcore_core.stages.metrics import MetricsResult
    from tasks.registry import decide

    def ev(value, false_positives=0, nominal=20, target=0.05, calibrated=True):
        op = {"threshold": 1.0, "fpr": false_positives / nominal, "tpr": 0.5, "n_nominal": nominal,
              "n_false_positives": false_positives, "target_fpr": target} if calibrated else None
        return MetricsResult(directory="/m", category="c", metrics={"image_auroc": value, "operating_point": op},
                             metrics_path="/m/x.json", figures={}, fingerprint="f")

    first = decide("m", ev(0.9), "1", None, None)
    assert first.promote and first.reason.startswith("no current champion; canary FPR 0/20 = 0.000")
    assert decide("m", ev(0.9), "2", ev(0.9), "1").promote  # not worse: promoted
    worse = decide("m", ev(0.89), "2", ev(0.9), "1")
    assert not worse.promote and worse.champion_value == 0.9 and worse.challenger_value == 0.89
    assert decide("m", ev(0.89), "2", ev(0.9), "1", min_delta=-0.02).promote  # tolerated regression
    assert not decide("m", ev(0.95), "2", ev(0.9), "1", min_delta=0.1).promote  # demanded gain
    assert "image_auroc(challenger) >= image_auroc(champion) + 0" in worse.rule and "binomial" in worse.rule
    with pytest.raises(ValueError, match="not among the evaluation metrics"):
        decide("m", ev(0.9), "2", ev(0.9), "1", metric="nope")

    # The operating point gate: better AUROC is not enough when the calibrated threshold flags too many good parts.
    assert decide("m", ev(0.95, false_positives=2), "2", ev(0.9), "1").promote  # 2/20 at 5 %: p = 0.26, noise
    noisy = decide("m", ev(0.95, false_positives=5), "2", ev(0.9), "1")  # 5/20 at 5 %: p = 0.003
    assert not noisy.promote and "above the target 0.05" in noisy.reason
    assert not decide("m", ev(0.95, false_positives=6), "1", None, None).promote  # even without a champion
    uncalibrated = decide("m", ev(0.99, calibrated=False), "2", ev(0.9), "1")
    assert not uncalibrated.promote and "no calibrated threshold" in uncalibrated.reason


def test_settings_storage_options_from_standard_env(monkeypatch):
    from tasks.settings import get_settings

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    settings = get_settings()
    assert settings.storage_options("s3://b/p") == {"endpoint_url": "http://127.0.0.1:1", "key": "k", "secret": "s"}
    assert settings.storage_options("/local/path") == {}
    monkeypatch.setenv("PATCHCORE_S3_ENDPOINT_URL", "http://127.0.0.1:2")
    assert get_settings().storage_options("s3://b")["endpoint_url"] == "http://127.0.0.1:2"
    assert "s" not in repr(get_settings().s3_secret_key)


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("PATCHCORE_DASK_MEMORY_LIMIT", "4 gigs", "not a size Dask reads"),
    ("PATCHCORE_DASK_MEMORY_LIMIT", "1GB", "below the 1.50 GiB a worker needs"),
    ("PATCHCORE_DASK_MEMORY_LIMIT", "-2", "must not be negative"),
    ("PATCHCORE_DASK_WORKERS", "two", "valid integer"),
    ("PATCHCORE_IMAGES_PER_SHARD", "0", "greater than or equal to 1"),
])
def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch, variable, value, message):
    from patchcore_core.errors import ConfigError
    from tasks.settings import get_settings

    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as raised:
        get_settings()
    text = str(raised.value)
    assert text.startswith(f"setting {variable}={value!r}: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("value", ["auto", "0", "0.25", "1.5GiB", "8GB", "4e9"])
def test_dask_memory_limits_dask_reads_are_kept(monkeypatch, value):
    from tasks.settings import get_settings

    monkeypatch.setenv("PATCHCORE_DASK_MEMORY_LIMIT", value)
    assert get_settings().dask_memory_limit == value
