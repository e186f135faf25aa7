"""Shard size (PATCHCORE_IMAGES_PER_SHARD): wall time, worker memory and results of the full benchmark on Dask.

    .venv/bin/python bench/bench_shard_size.py [--categories bottle pill] [--sizes 8 16 32 64 128] [--workers 2]

Each size runs `patchcore(mode="full-benchmark")` on a fresh local cluster of `--workers` single-thread workers
in a fresh work dir, as `PATCHCORE_IMAGES_PER_SHARD=S python -m flows.demo --dask-workers 2` does. It records
wall time, each worker's peak RSS, the extraction and scoring tasks (count, seconds, seconds per image) from
the Prefect API, and compares metrics, scores and maps with the default size's run. Writes
bench/results/shard_size.md and bench/results/shard_size.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_scale  # noqa: E402 - sets the thread and telemetry environment the same way
import numpy as np  # noqa: E402

WORK = REPO / "bench" / "results" / "work" / "shard_size"
RESULTS = REPO / "bench" / "results"


def run_size(size: int, workers: int, data: Path, categories: list[str], preset: str) -> dict:
    """One full benchmark with shards of `size` images on a fresh local cluster."""
    from flows.patchcore import patchcore
    from patchcore_core.config import DetectorParams, preset_values

    work = WORK / f"shard-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["PATCHCORE_IMAGES_PER_SHARD"] = str(size)
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with bench_scale.MemorySampler() as memory:
        runs = patchcore(mode="full-benchmark", data_url=str(data), categories=categories,
                         config=DetectorParams(**preset_values(preset)), work_dir=str(work), dask_workers=workers)
    wall = time.perf_counter() - t0
    tasks = bench_scale.task_runs_since(started)
    shutil.rmtree(work / "features", ignore_errors=True)  # about 1 GB a run; the scores and maps are kept
    print(f"shards of {size}: {wall:.1f} s", flush=True)
    return {"size": size, "wall_seconds": round(wall, 1), "worker_peaks_mb": memory.worker_peaks_mb(),
            "cpu_seconds": memory.cpu_seconds(), "runs": runs, "tasks": tasks}


def task_summary(tasks: list[dict], prefix: str) -> tuple[int, float]:
    """How many tasks are shard parts of `prefix` (extract-…-N, score-…-N), and their seconds in all."""
    parts = [t for t in tasks if t["name"].startswith(prefix + "-") and t["name"].rsplit("-", 1)[-1].isdigit()]
    return len(parts), sum(t["end"] - t["start"] for t in parts)


def compare(a: dict, b: dict) -> dict:
    """Bitwise equality of every category's metrics, scores and maps; else the largest score difference."""
    same = bench_scale.identical(a, b)
    diff = max(float(np.max(np.abs(a[c]["scores"] - b[c]["scores"]))) for c in a)
    metrics = max(abs(a[c]["metrics"][k] - b[c]["metrics"][k]) for c in a for k in a[c]["metrics"]
                  if isinstance(a[c]["metrics"][k], float))
    return {"identical": same, "max_score_diff": diff, "max_metric_diff": metrics}


def write_report(results: list[dict], reference: int, workers: int, categories: list[str], preset: str,
                 counts: dict) -> None:
    n_images = sum(sum(v) for v in counts.values())
    n_test = sum(v[1] for v in counts.values())
    lines = [
        "# Shard size on Dask (`PATCHCORE_IMAGES_PER_SHARD`)",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} cores: "
        f"`.venv/bin/python bench/bench_shard_size.py`; {', '.join(categories)} "
        f"({n_images} images, {n_test} of them test), `{preset}` preset, {workers} local Dask workers of one "
        "thread, a fresh cluster and work dir per size. Peak RSS per worker is sampled every 0.25 s.",
        "",
        "| images per shard | wall s | extract tasks | extract s/image | score tasks | score s/image "
        "| peak RSS per worker (MB) | results vs " + f"{reference} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        n_ex, s_ex = r["extract"]
        n_sc, s_sc = r["score"]
        cmp = r["compare"]
        same = ("reference" if r["size"] == reference else "bitwise identical" if cmp["identical"]
                else f"scores differ by up to {cmp['max_score_diff']:.2g}, metrics by {cmp['max_metric_diff']:.2g}")
        lines.append(f"| {r['size']} | {r['wall_seconds']} | {n_ex} | {s_ex / n_images:.3f} | {n_sc} | "
                     f"{s_sc / n_test:.3f} | {' / '.join(str(p) for p in r['worker_peaks_mb'])} | {same} |")
    best = min(results, key=lambda r: r["wall_seconds"])
    lines += [
        "",
        "Metrics (image AUROC / pixel AUROC / AU-PRO) of the reference run: " + "; ".join(
            f"{c} {m['image_auroc']:.4f} / {m['pixel_auroc']:.4f} / {m['au_pro']:.4f}"
            for c, m in results[[r["size"] for r in results].index(reference)]["metrics"].items()) + ".",
        "",
        f"Fastest here: {best['size']} images per shard ({best['wall_seconds']} s). Seconds per image are the tasks' "
        "own time (Prefect task runs), so they include each task's fixed cost; wall time adds the scheduling, "
        "the idle tail when the last shards of a split are uneven, and the flow process's MLflow work.",
    ]
    (RESULTS / "shard_size.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "shard_size.json").write_text(json.dumps({
        "workers": workers, "preset": preset, "categories": categories, "counts": counts, "reference": reference,
        "results": [{k: v for k, v in r.items() if k not in ("runs", "tasks", "outputs")} for r in results],
    }, indent=1))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--preset", default="fast")
    args = parser.parse_args()
    from patchcore_core.stages.extract import IMAGES_PER_SHARD

    reference = IMAGES_PER_SHARD if IMAGES_PER_SHARD in args.sizes else args.sizes[0]
    bench_scale.WORK = WORK
    data = bench_scale.prepare_data(args.categories)
    counts = {c: bench_scale.MVTEC_COUNTS.get(c) or (
        len(list((data / c / "train" / "good").iterdir())),
        sum(len(list(d.iterdir())) for d in (data / c / "test").iterdir())) for c in args.categories}
    results = [run_size(s, args.workers, data, args.categories, args.preset) for s in args.sizes]
    outputs = {r["size"]: bench_scale.outputs(r["runs"]) for r in results}
    for r in results:
        r["extract"] = task_summary(r["tasks"], "extract")
        r["score"] = task_summary(r["tasks"], "score")
        r["compare"] = compare(outputs[r["size"]], outputs[reference])
        r["metrics"] = {c: {k: o["metrics"][k] for k in ("image_auroc", "pixel_auroc", "au_pro")}
                        for c, o in outputs[r["size"]].items()}
    write_report(results, reference, args.workers, args.categories, args.preset, counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
