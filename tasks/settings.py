"""Pipeline settings from the environment: where to work, which device, S3 endpoint and credentials, MLflow.

Standard variables are honoured: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, MLFLOW_TRACKING_URI; PATCHCORE_* names take precedence. Credentials never travel as
task parameters (they would be logged and hashed into cache keys): each task reads them here.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from patchcore_core.errors import ConfigError

# A Dask worker that has imported torch and faiss holds about 1 GiB before its first task, every stage peaks at
# 1.0-1.4 GB more on the smallest backbone (docs/scale.md), and the nanny restarts a worker at 95 % of its limit:
# under this limit every stage's worker is killed and retried until Dask gives up.
MIN_WORKER_MEMORY = 1.5 * 2**30


class PipelineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PATCHCORE_", extra="ignore", populate_by_name=True)

    work_dir: Path = Field(Path("runs/pipeline"), description="local cache, shards, models, scores, MLflow DB")
    device: str = Field("auto", description="torch/faiss device: auto (CUDA when present), cpu, cuda, cuda:N")
    threads: int | None = Field(None, description="torch/faiss threads (default: all usable cores)")
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("PATCHCORE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
    )
    s3_access_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PATCHCORE_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID")
    )
    s3_secret_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("PATCHCORE_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY")
    )
    retention_days: float | None = Field(
        None, ge=0, description="`python -m tasks.gc` removes stage folders unused for this many days (none: keep)")
    images_per_shard: int | None = Field(
        None, ge=1, description="images per feature shard: the unit of work a cluster spreads (one task per shard; "
                                "none: patchcore_core.stages.extract.IMAGES_PER_SHARD, 32)")
    dask_address: str | None = Field(
        None, description="run the flows' tasks on this Dask scheduler (tcp://host:8786); the work dir must be shared")
    dask_workers: int | None = Field(
        None, ge=1, description="else, when set: a local Dask cluster of this many worker processes on 127.0.0.1")
    dask_threads_per_worker: int = Field(
        1, ge=1, description="threads of each local Dask worker (torch, faiss and numba use as many per task)")
    dask_memory_limit: str = Field(
        "auto", description="memory limit of each local Dask worker (Dask syntax: 4GiB, auto = RAM / workers)")

    @field_validator("dask_memory_limit")
    @classmethod
    def _memory_limit(cls, value: str) -> str:
        """Dask's syntax, checked here rather than when the cluster starts: 'auto', 0 (no limit), a fraction of the
        machine's memory up to 1, or a size (bytes or '4GiB') of at least MIN_WORKER_MEMORY."""
        from dask.utils import format_bytes, parse_bytes

        text = str(value).strip()
        if text == "auto":
            return text
        try:
            number = float(text)
        except ValueError:
            try:
                number = float(parse_bytes(text))
            except ValueError:
                raise ValueError("not a size Dask reads (auto, 0, a fraction up to 1, 4GiB, 4e9)") from None
        if number < 0:
            raise ValueError("must not be negative")
        if 1 < number < MIN_WORKER_MEMORY:
            raise ValueError(f"{format_bytes(int(number))} is below the {format_bytes(int(MIN_WORKER_MEMORY))} a "
                             "worker needs: it holds about 1 GiB once torch and faiss are imported, and Dask restarts "
                             "it at 95 % of its limit")
        return text

    mlflow_tracking_uri: str | None = Field(
        None, validation_alias=AliasChoices("PATCHCORE_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI")
    )

    def storage_options(self, url: str) -> dict:
        """fsspec options for `url`: endpoint and keys for s3:// (no region: S3-compatible servers ignore it)."""
        if not str(url).startswith(("s3://", "s3a://")):
            return {}
        options: dict = {}
        if self.s3_endpoint_url:
            options["endpoint_url"] = self.s3_endpoint_url
        if self.s3_access_key and self.s3_secret_key:
            options["key"] = self.s3_access_key.get_secret_value()
            options["secret"] = self.s3_secret_key.get_secret_value()
        return options

    def resolve_work_dir(self, work_dir: str | None = None) -> Path:
        return Path(work_dir or self.work_dir).expanduser().resolve()


def get_settings() -> PipelineSettings:
    """Fresh settings from the current environment (cheap; not cached so tests can change the environment).
    A bad value raises ConfigError, one line naming the variable and the value."""
    try:
        return PipelineSettings()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        upper = field.upper()
        name = upper if upper.startswith(("PATCHCORE_", "AWS_", "MLFLOW_")) else f"PATCHCORE_{upper}"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"setting {name}={first.get('input')!r}: {message}") from None
