#!/usr/bin/env python
"""What a person sees before promoting a model by hand: screenshots of a real `mlflow server`'s UI.

Starts `prefect server start` and `mlflow server` on loopback (temporary folders), runs two nightly retrains of
one demo category (v1 becomes champion; v2, another coreset size, is compared with it on the same canary
set), then takes headless-Chromium screenshots of the model version page of v2 (description: metrics,
operating point, settings, the comparison with the champion, figure links), of its run page ("Datasets
used") and of the figure its first link opens::

    apt-get install -y chromium
    .venv/bin/python bench/mlflow_ui_screenshot.py [--out bench/results/mlflow_ui]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {"backbone": "efficientnet_lite0", "image_size": 64, "resize": 72, "batch_size": 4}


def _servers():
    spec = importlib.util.spec_from_file_location("local_servers", REPO / "infra" / "local_servers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["local_servers"] = module
    spec.loader.exec_module(module)
    return module


def screenshot(url: str, out: Path, size: str = "1400,2000") -> Path:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        raise SystemExit("chromium not found: apt-get install -y chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={size}", "--virtual-time-budget=20000",
                        f"--screenshot={out}", url], check=True, capture_output=True, timeout=180)
    return shrink_png(out)


def shrink_png(path: Path, colours: int = 64) -> Path:
    """Rewrite a screenshot as a palette PNG (UI pages have few colours): a fraction of the size, still legible."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "mlflow_ui"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    servers = _servers()
    tmp = Path(tempfile.mkdtemp(prefix="patchcore-ui-"))
    prefect = servers.PrefectServer(tmp / "prefect").start()
    mlflow_server = servers.MlflowServer(tmp / "mlflow").start()
    try:
        os.environ.update({**servers.QUIET_ENV, "PREFECT_API_URL": prefect.url, "PREFECT_HOME": str(tmp / "client"),
                           "MLFLOW_TRACKING_URI": mlflow_server.url, "PATCHCORE_WORK_DIR": str(tmp / "work"),
                           "PATCHCORE_DEVICE": "cpu"})
        from flows.patchcore import patchcore
        from patchcore_core.config import DetectorParams
        from patchcore_core.demo_data import write_demo_dataset

        data = write_demo_dataset(tmp / "data" / "mvtec-demo", categories=["brick"], n_train=8, n_test_good=4,
                                  n_test_defect=4, size=96)
        decisions = []
        for ratio in (0.25, 0.5):
            [d] = patchcore(mode="nightly-retrain", data_url=str(data), product_line="demo", categories=["brick"],
                            config=DetectorParams(**OFFLINE, coreset_ratio=ratio))
            decisions.append(d)
            print(d.summary())
        from mlflow import MlflowClient

        client = MlflowClient(mlflow_server.url, mlflow_server.url)
        version = client.get_model_version("patchcore-brick", decisions[-1].challenger_version)
        run = client.get_run(version.run_id)
        print(version.description)
        base = mlflow_server.url
        shots = [
            screenshot(f"{base}/#/models/patchcore-brick/versions/{version.version}", out / "model_version.png"),
            screenshot(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}", out / "run.png"),
            screenshot(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}/artifacts/"
                       "figures/roc_pr.png", out / "figure_link.png", size="1400,1100"),
        ]
        for shot in shots:
            print(f"wrote {shot}")
    finally:
        mlflow_server.stop()
        prefect.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
