"""`make demo`: run `patchcore/full-benchmark` end to end on embedded defaults, offline.

Writes the demo dataset into a local bucket folder, runs the `patchcore` flow (Prefect's ephemeral server
unless PREFECT_API_URL points at a real one; MLflow on SQLite in the work dir), prints the results table and
the commands to browse the runs::

    .venv/bin/python -m flows.demo [--work-dir runs/demo] [--categories brick gravel] [--preset fast] [--image-size 224]
                                   [--dask-workers 2 | --dask-address tcp://host:8786]

The detector starts from the `offline` preset (offline ImageNet weights, patchcore_core.config.PRESETS);
every settings flag of `patchcore fit` is accepted and overrides it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from patchcore_core.config import add_cli_options, from_cli, preset_values
from patchcore_core.errors import ConfigError
from tasks.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", default=os.environ.get("PATCHCORE_WORK_DIR", "runs/demo"))
    parser.add_argument("--categories", nargs="*", default=None, help="demo categories (default: all three)")
    parser.add_argument("--data-url", default=None, help="skip the demo dataset and benchmark this URL instead")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--dask-workers", type=int, default=None, metavar="N",
                       help="run categories and shards in parallel on a local Dask cluster of N worker processes "
                            "(127.0.0.1, PATCHCORE_DASK_THREADS_PER_WORKER threads each, default 1)")
    scale.add_argument("--dask-address", default=None, metavar="tcp://HOST:8786",
                       help="run them on this existing Dask scheduler (its workers must see the work dir)")
    # Every detector setting of the schema; the demo starts from the `offline` preset (offline weights only),
    # `--preset fast` is the quick one, and any flag overrides a preset's value.
    add_cli_options(parser)
    args = parser.parse_args(argv)
    try:
        config = from_cli(args, base=preset_values("offline"))
        if args.dask_workers is not None and args.dask_workers < 1:
            raise ConfigError(f"setting --dask-workers: must be >= 1 (got {args.dask_workers})")
        get_settings()  # the PATCHCORE_* environment, checked before any work
    except ConfigError as exc:
        print(f"python -m flows.demo: error: {exc}", file=sys.stderr)
        return 2

    work = Path(args.work_dir).resolve()
    os.environ["PATCHCORE_WORK_DIR"] = str(work)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    # The ephemeral server migrates a fresh database on first start: give a busy 2-core machine time.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Offline and local: no usage telemetry from the ephemeral Prefect server or from MLflow (their attempts
    # print "Failed to send telemetry" errors with no network). Users may still turn them on.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")

    data_url = args.data_url
    if data_url is None:
        from patchcore_core.demo_data import write_demo_dataset

        bucket = work / "bucket" / "mvtec-demo"
        if not (bucket / "demo_dataset.json").is_file():
            print(f"writing the demo dataset to {bucket} ...", flush=True)
            write_demo_dataset(bucket, categories=args.categories)
        data_url = str(bucket)

    from flows.patchcore import patchcore
    from tasks.tracking import markdown_table, results_table

    print(f"settings: {json.dumps(config.model_dump())}", flush=True)
    if args.dask_workers:
        print(f"stages run on a local Dask cluster of {args.dask_workers} workers on 127.0.0.1", flush=True)
    elif args.dask_address:
        print(f"stages run on the Dask scheduler at {args.dask_address}", flush=True)
    runs = patchcore(mode="full-benchmark", data_url=data_url, categories=args.categories, config=config,
                     work_dir=str(work), dask_address=args.dask_address, dask_workers=args.dask_workers)
    tracking = os.environ["MLFLOW_TRACKING_URI"]
    print("\nPatchCore full benchmark (image AUROC, pixel AUROC, AU-PRO):\n")
    print(markdown_table(results_table(runs)))
    print(f"\nartifacts, shards and models under {work}")
    print(f"browse the runs and registered models:  mlflow ui --backend-store-uri {tracking}")
    if not os.environ.get("PREFECT_API_URL"):
        print("the flow ran on Prefect's ephemeral server; `prefect server start` shows its runs in the UI")
    return 0


if __name__ == "__main__":
    sys.exit(main())
