"""Tasks of the score-batch flow: resolve a registered model, list new images under a bucket prefix, score one
shard of them and write its outputs back to the bucket.

Idempotent by content: every image is identified by the sha256 of its bytes, and an image whose hash is already
in the results for the same model version is skipped. Per-file errors are results (an `error` row), never a
reason to stop the batch.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from patchcore_core.artifacts import CONFIG_FILE, MODEL_FILES
from patchcore_core.data import IMAGE_EXTENSIONS, open_location
from patchcore_core.errors import ConfigError
from tasks.common import IO_RETRIES, log
from tasks.settings import get_settings
from tasks.tracking import client_for

PREDICTIONS_DIR = "predictions"  # <results>/predictions/part-*.parquet, one per scored shard
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


class ResolvedModel(BaseModel):
    """A registered model version, downloaded as a model folder."""

    name: str
    version: str
    model_dir: str
    run_id: str | None = None


class ShardResult(BaseModel):
    shard: int
    n_images: int
    n_scored: int
    n_already_scored: int
    n_errors: int
    n_anomalous: int
    predictions: str | None = None


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """(name, alias, version) of `models:/<name>@<alias>` or `models:/<name>/<version>`."""
    match = _MODEL_URI.match(uri)
    if not match:
        raise ConfigError(f"setting model_uri: expected models:/<name>@<alias> or models:/<name>/<version> "
                          f"(got {uri!r})")
    return match["name"], match["alias"], match["version"]


def download_model_version(work_dir: str, name: str, version: str, run_id: str | None) -> Path:
    """The model folder of a registered version under `<work_dir>/models/`, downloaded once (atomically)."""
    target = Path(work_dir) / "models" / name / f"v{version}-{(run_id or 'norun')[:12]}"
    model_dir = target / "model"
    if (model_dir / CONFIG_FILE).is_file():
        return model_dir
    target.mkdir(parents=True, exist_ok=True)
    download = Path(tempfile.mkdtemp(prefix=".download-", suffix=".tmp", dir=target))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}",
                                                         dst_path=str(download / "files")))
        (download / "model").mkdir()
        for file in MODEL_FILES:
            shutil.copy2(local / "artifacts" / file, download / "model" / file)
        try:
            (download / "model").rename(model_dir)
        except OSError:  # another run put the same version there first
            if not (model_dir / CONFIG_FILE).is_file():
                raise
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return model_dir


@task(name="resolve-model", cache_policy=NO_CACHE, **IO_RETRIES)
def resolve_model(work_dir: str, model_uri: str) -> ResolvedModel:
    """The version behind `model_uri` (an alias is read now, once per batch), downloaded locally."""
    name, alias, version = parse_model_uri(model_uri)
    client = client_for(work_dir)
    entry = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    model_dir = download_model_version(work_dir, name, str(entry.version), entry.run_id)
    log(f"scoring with {name} v{entry.version} ({model_uri})")
    return ResolvedModel(name=name, version=str(entry.version), model_dir=str(model_dir), run_id=entry.run_id)


@task(name="list-images", cache_policy=NO_CACHE, **IO_RETRIES)
def list_images(images_url: str) -> list[str]:
    """Every image file under the prefix (recursively), sorted: the batch's input."""
    fs, base = open_location(images_url, get_settings().storage_options(images_url))
    fs.invalidate_cache()
    found = [p for p in fs.find(base) if p.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(posixpath.relpath(p, base.rstrip("/")) for p in found)


def already_scored(results_url: str, model: ResolvedModel) -> set[str]:
    """Content hashes already scored by this model version under the results prefix."""
    options = get_settings().storage_options(results_url)
    fs, base = open_location(results_url, options)
    fs.invalidate_cache()
    parts = fs.glob(posixpath.join(base, PREDICTIONS_DIR, "part-*.parquet"))
    done: set[str] = set()
    for part in parts:
        with fs.open(part, "rb") as fh:
            table = pd.read_parquet(fh, columns=["content_sha256", "model_name", "model_version", "error"])
        ok = table[(table.model_name == model.name) & (table.model_version == model.version) & table.error.isna()]
        done.update(ok.content_sha256)
    return done


@task(name="combine-predictions", cache_policy=NO_CACHE, **IO_RETRIES)
def combine_predictions(results_url: str) -> str:
    """<results>/predictions.parquet: every part under predictions/, newest part's row first per (key, model)."""
    fs, base = open_location(results_url, get_settings().storage_options(results_url))
    fs.invalidate_cache()
    tables = []
    for part in sorted(fs.glob(posixpath.join(base, PREDICTIONS_DIR, "part-*.parquet"))):
        with fs.open(part, "rb") as fh:
            tables.append(pd.read_parquet(fh))
    combined = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    path = posixpath.join(base, "predictions.parquet")
    with tempfile.TemporaryDirectory() as tmp:
        combined.to_parquet(Path(tmp) / "p.parquet", index=False)
        fs.put_file(str(Path(tmp) / "p.parquet"), path)
    return fs.unstrip_protocol(path)


@task(name="score-shard", task_run_name="score-shard-{shard}", cache_policy=NO_CACHE, **IO_RETRIES)
def score_shard(model: ResolvedModel, images_url: str, keys: list[str], shard: int, results_url: str,
                work_dir: str, run_tag: str) -> ShardResult:
    """Download the shard's images, skip those this model already scored, score the rest, upload the
    predictions part, masks and heatmaps under the results prefix."""
    from patchcore_core.baselines import load_detector
    from patchcore_core.data import screen_images
    from patchcore_core.prediction import write_predictions

    settings = get_settings()
    src_fs, src_base = open_location(images_url, settings.storage_options(images_url))
    out_fs, out_base = open_location(results_url, settings.storage_options(results_url))
    done = already_scored(results_url, model)
    local = Path(tempfile.mkdtemp(prefix=f"shard-{shard}-", dir=Path(work_dir)))
    try:
        paths, hashes, names, key_of, skipped = [], {}, {}, {}, 0
        for key in keys:
            data = src_fs.cat_file(posixpath.join(src_base, key))
            digest = hashlib.sha256(data).hexdigest()
            if digest in done:
                skipped += 1
                continue
            path = local / "in" / f"{len(paths):05d}{Path(key).suffix.lower()}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            paths.append(str(path))
            hashes[str(path)] = digest
            key_of[str(path)] = key
            names[str(path)] = re.sub(r"[^A-Za-z0-9._-]", "_", key.rsplit(".", 1)[0].replace("/", "__"))
        if not paths:
            return ShardResult(shard=shard, n_images=len(keys), n_scored=0, n_already_scored=skipped, n_errors=0,
                               n_anomalous=0)
        detector = load_detector(model.model_dir, device=settings.device)
        detector.set_params(progress=False, **({"num_threads": settings.threads} if settings.threads else {}))
        usable, bad = screen_images(paths, skip_bad=True)
        errors = {p: reason.replace(p, key_of[p]) for p, reason in bad.items()}  # name the key, not our copy
        scores, maps = detector.predict(usable) if usable else ([], [])
        order = usable + list(errors)
        out = local / "out"
        write_predictions(
            out, detector, usable, scores, maps, errors={p: errors[p] for p in errors},
            model_fingerprint=getattr(detector, "model_fingerprint_", ""), names=[names[p] for p in order],
            extra={"key": [key_of[p] for p in order], "content_sha256": [hashes[p] for p in order],
                   "model_name": [model.name] * len(order), "model_version": [model.version] * len(order)})
        table = pd.read_parquet(out / "predictions.parquet")
        table["path"] = [posixpath.join(images_url.rstrip("/"), k) for k in table["key"]]
        part = posixpath.join(out_base, PREDICTIONS_DIR, f"part-{run_tag}-{shard:05d}.parquet")
        for folder in ("masks", "heatmaps"):
            if (out / folder).is_dir():
                out_fs.put(str(out / folder) + "/", posixpath.join(out_base, folder) + "/", recursive=True)
        table.to_parquet(local / "part.parquet", index=False)
        out_fs.put_file(str(local / "part.parquet"), part)  # the part last: its presence means the shard is done
        n_anomalous = int(table["is_anomalous"].fillna(False).sum())
        return ShardResult(shard=shard, n_images=len(keys), n_scored=len(usable), n_already_scored=skipped,
                           n_errors=len(errors), n_anomalous=n_anomalous, predictions=out_fs.unstrip_protocol(part))
    finally:
        shutil.rmtree(local, ignore_errors=True)
