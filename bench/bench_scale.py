"""Scale-out benchmark (issue #11): the full benchmark on one process, on 1 Dask worker and on 2 (one thread each).

    .venv/bin/python bench/bench_scale.py [--categories brick grass gravel bottle pill] [--preset fast]

One data root holds the demo categories (written) and MVTec AD bottle and pill (links to ../shared/data). Each
configuration runs `patchcore(mode="full-benchmark")` in a fresh work dir, as `python -m flows.demo
--dask-workers N` does; the script records wall time, the peak memory of every process (psutil, sampled), the
start and end of every task run (Prefect API), and checks that the metrics, scores and anomaly maps of every
configuration are the same bits. From the measured task times it then models how a 15-category MVTec AD
benchmark scales with N workers (a list-scheduling simulation of the same task graph) and writes
bench/results/scale.md and bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("PATCHCORE_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psutil  # noqa: E402

MVTEC = REPO.parent / "shared" / "data" / "mvtec_ad"
WORK = REPO / "bench" / "results" / "work" / "scale"
# MVTec AD (Bergmann et al., CVPR 2019, Table 1): train / test images per category; bottle and pill are checked
# against the copy on disk below.
MVTEC_COUNTS = {
    "bottle": (209, 83), "cable": (224, 150), "capsule": (219, 132), "carpet": (280, 117), "grid": (264, 78),
    "hazelnut": (391, 110), "leather": (245, 124), "metal_nut": (220, 115), "pill": (267, 167),
    "screw": (320, 160), "tile": (230, 117), "toothbrush": (60, 42), "transistor": (213, 100), "wood": (247, 79),
    "zipper": (240, 151),
}
CONFIGS = (("one process", None), ("1 Dask worker", 1), ("2 Dask workers", 2))


class MemorySampler:
    """Peak RSS of this process and of every descendant (Dask workers, the Prefect server), sampled."""

    def __init__(self, period: float = 0.25) -> None:
        self.period, self.peak_total, self.peak_by_pid, self._stop = period, 0, {}, threading.Event()
        self.names: dict[int, str] = {}
        self.cpu: dict[int, float] = {}
        self.start_cpu: dict[int, float] = {}

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for proc in [me, *me.children(recursive=True)]:
                try:
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                    self.names.setdefault(proc.pid, " ".join(proc.cmdline()[:4]))
                except psutil.Error:
                    continue
                self.cpu[proc.pid] = cpu.user + cpu.system
                total += rss
                self.peak_by_pid[proc.pid] = max(self.peak_by_pid.get(proc.pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            self._stop.wait(self.period)

    def __enter__(self) -> MemorySampler:
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:  # the Prefect server may already run: count from now
            try:
                cpu = proc.cpu_times()
                self.start_cpu[proc.pid] = cpu.user + cpu.system
            except psutil.Error:
                pass
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds used during the run: Dask workers, the Prefect server, the flow process (with this sampler)."""
        groups = {"workers": 0.0, "prefect server": 0.0, "flow process": 0.0}
        me = os.getpid()
        for pid, cpu in self.cpu.items():
            used = cpu - self.start_cpu.get(pid, 0.0)
            name = self.names.get(pid, "")
            group = ("flow process" if pid == me else "workers" if "spawn_main" in name
                     else "prefect server" if "uvicorn" in name else None)
            if group:
                groups[group] += used
        return {k: round(v, 1) for k, v in groups.items()}

    def worker_peaks_mb(self) -> list[float]:
        return sorted((round(v / 2**20) for p, v in self.peak_by_pid.items()
                       if "spawn_main" in self.names.get(p, "")),
                      reverse=True)


def prepare_data(categories: list[str]) -> Path:
    """One MVTec-layout root: demo categories written, MVTec ones linked (never copied into the repo)."""
    from patchcore_core.demo_data import DEMO_PHOTOS, write_demo_dataset

    root = WORK / "data" / "mvtec-scale"
    demo = [c for c in categories if c in DEMO_PHOTOS]
    if demo and not all((root / c).is_dir() for c in demo):
        tmp = WORK / "data" / "demo"
        shutil.rmtree(tmp, ignore_errors=True)
        write_demo_dataset(tmp, categories=demo)
        root.mkdir(parents=True, exist_ok=True)
        for c in demo:
            shutil.rmtree(root / c, ignore_errors=True)
            shutil.move(str(tmp / c), root / c)
    for c in categories:
        if c not in DEMO_PHOTOS:
            link = root / c
            if not link.exists():
                root.mkdir(parents=True, exist_ok=True)
                link.symlink_to(MVTEC / c, target_is_directory=True)
            n_train = len(list((MVTEC / c / "train" / "good").iterdir()))
            n_test = sum(len(list(d.iterdir())) for d in (MVTEC / c / "test").iterdir())
            assert (n_train, n_test) == MVTEC_COUNTS[c], (c, n_train, n_test)
    return root


def task_runs_since(start: datetime) -> list[dict]:
    """Every task run that started after `start`: name, start and end (seconds since `start`)."""
    from prefect import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    rows, offset = [], 0
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_task_runs(task_run_filter=TaskRunFilter(
                start_time=TaskRunFilterStartTime(after_=start)), limit=200, offset=offset)
            rows += page
            offset += len(page)
            if len(page) < 200:
                break
    subflows = ("full-benchmark", "benchmark-category")  # a subflow call shows as a task run of its parent
    return sorted(({"name": r.name, "start": (r.start_time - start).total_seconds(),
                    "end": (r.end_time - start).total_seconds()} for r in rows
                   if r.start_time and r.end_time and not r.name.startswith(subflows)),
                  key=lambda r: r["start"])


def run_config(label: str, workers: int | None, data: Path, categories: list[str], preset: str) -> dict:
    from flows.patchcore import patchcore
    from patchcore_core.config import DetectorParams, preset_values

    work = WORK / re.sub(r"\W+", "-", label)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    config = DetectorParams(**preset_values(preset))
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    with MemorySampler() as memory:
        runs = patchcore(mode="full-benchmark", data_url=str(data), categories=categories, config=config,
                         work_dir=str(work), dask_workers=workers)
    wall = time.perf_counter() - t0
    print(f"{label}: {wall:.1f} s", flush=True)
    (work / "params.json").write_text(config.model_dump_json())  # inputs of bench/bench_stage_memory.py
    for r in runs:
        (work / f"fetched-{r.category}.json").write_text(r.fetched.model_dump_json())
    return {"label": label, "workers": workers, "wall_seconds": round(wall, 1), "work": str(work),
            "peak_total_mb": round(memory.peak_total / 2**20), "worker_peaks_mb": memory.worker_peaks_mb(),
            "cpu_seconds": memory.cpu_seconds(),
            "runs": runs, "tasks": task_runs_since(started)}


def outputs(runs) -> dict[str, dict]:
    out = {}
    for r in runs:
        metrics = json.loads(Path(r.evaluation.metrics_path).read_text())
        out[r.category] = {"metrics": {k: v for k, v in metrics.items() if "seconds" not in k},
                           "scores": pd.read_parquet(r.scores.predictions)["score"].to_numpy(),
                           "maps": np.load(r.scores.maps)}
    return out


def identical(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[c]["metrics"] == b[c]["metrics"] and np.array_equal(a[c]["scores"], b[c]["scores"])
        and np.array_equal(a[c]["maps"], b[c]["maps"]) for c in a)


# ------------------------------------------------------------------------------------------------ the model
def stage_of(name: str) -> tuple[str, str]:
    """(stage, category) of a task run name such as extract-pill-train-3, coreset-pill, score-pill-0."""
    for stage in ("extract", "coreset", "calibrate", "index", "score", "metrics", "fetch"):
        if name.startswith(stage + "-"):
            rest = name[len(stage) + 1:]
            for split in ("-train", "-test"):
                if split in rest:
                    rest = rest.split(split)[0]
                    part = name.rsplit("-", 1)[-1].isdigit()
                    return (f"{stage}{split}{'-part' if part else ''}", rest)
            if re.search(r"-\d+$", rest):
                return (f"{stage}-part", rest.rsplit("-", 1)[0])
            return (stage, rest)
    if name.startswith(("mlflow-", "publish-")):
        return ("MLflow logging + artifacts (flow process)", "")
    return (name.rsplit("-", 1)[0], "")


def per_category_costs(tasks: list[dict], counts: dict[str, tuple[int, int]]) -> dict:
    """Measured seconds per category and stage on one thread (per image where a stage scales with images)."""
    by: dict[tuple[str, str], float] = {}
    for t in tasks:
        key = stage_of(t["name"])
        by[key] = by.get(key, 0.0) + t["end"] - t["start"]
    costs: dict[str, dict[str, float]] = {}
    for c, (n_train, n_test) in counts.items():
        costs[c] = {
            "fetch_per_image": by.get(("fetch", c), 0.0) / (n_train + n_test),
            "extract_per_image": (by.get(("extract-train-part", c), 0) + by.get(("extract-test-part", c), 0))
            / (n_train + n_test),
            "extract_finish": (by.get(("extract-train", c), 0) + by.get(("extract-test", c), 0)) / 2,
            "coreset": by.get(("coreset", c), 0.0),
            "calibrate": by.get(("calibrate", c), 0.0),
            "index": by.get(("index", c), 0.0),
            "score_per_image": by.get(("score-part", c), 0) / n_test,
            "score_merge_per_image": by.get(("score", c), 0) / n_test,
            "metrics_per_image": by.get(("metrics", c), 0) / n_test,
        }
    return costs


def simulate(categories: dict[str, tuple[int, int]], cost, workers: int, shard: int = 32,
             overhead: float = 0.0) -> tuple[float, dict]:
    """Makespan of the task graph of a full benchmark on `workers` single-task workers (list scheduling in
    submission order, as the flow submits: all fetches, then each category's graph), and busy time per stage."""
    tasks: list[tuple[str, str, float, list[int]]] = []  # (name, stage, seconds, inputs)

    def add(name: str, stage: str, seconds: float, inputs: list[int]) -> int:
        tasks.append((name, stage, seconds + overhead, inputs))
        return len(tasks) - 1

    fetches = {c: add(f"fetch-{c}", "fetch", cost(c, *n)["fetch_per_image"] * sum(n), [])
               for c, n in categories.items()}
    for c, (n_train, n_test) in categories.items():
        k = cost(c, n_train, n_test)
        splits = []
        for split, n in (("train", n_train), ("test", n_test)):
            parts = [add(f"extract-{c}-{split}-{i}", "extract", k["extract_per_image"] * min(shard, n - i * shard),
                         [fetches[c]]) for i in range(math.ceil(n / shard))]
            splits.append(add(f"extract-{c}-{split}", "extract", k["extract_finish"], parts))
        coreset = add(f"coreset-{c}", "coreset", k["coreset"], [splits[0]])
        calibrate = add(f"calibrate-{c}", "calibrate", k["calibrate"], [splits[0]])
        index = add(f"index-{c}", "index", k["index"], [coreset, calibrate])
        parts = [add(f"score-{c}-{i}", "score", k["score_per_image"] * min(shard, n_test - i * shard),
                     [index, splits[1]]) for i in range(math.ceil(n_test / shard))]
        merged = add(f"score-{c}", "score", k["score_merge_per_image"] * n_test, parts)
        add(f"metrics-{c}", "metrics", k["metrics_per_image"] * n_test, [merged])
    done_at: list[float | None] = [None] * len(tasks)
    free = [0.0] * workers
    busy: dict[str, float] = {}
    pending = list(range(len(tasks)))
    while pending:
        # the worker that frees first takes the ready task that can start earliest (submission order on ties)
        w = min(range(workers), key=lambda j: free[j])
        ready = [(max([done_at[d] for d in tasks[i][3]] + [free[w]]), i) for i in pending
                 if all(done_at[d] is not None for d in tasks[i][3])]
        start, i = min(ready)
        done_at[i] = start + tasks[i][2]
        free[w] = done_at[i]
        busy[tasks[i][1]] = busy.get(tasks[i][1], 0.0) + tasks[i][2]
        pending.remove(i)
    return max(done_at), busy


def coreset_model(costs: dict, counts: dict) -> float:
    """Greedy coreset seconds = a * n_train^2 (it computes n_selected x n_patches distances, both proportional to
    n_train); `a` is the mean over the measured MVTec categories. Calibration is a second, smaller coreset."""
    xs = [costs[c]["coreset"] / counts[c][0] ** 2 for c in costs if c in MVTEC_COUNTS and costs[c]["coreset"] > 0]
    if not xs:
        raise SystemExit("the coreset model needs a measured MVTec category (bottle or pill)")
    return float(np.mean(xs))


def write_report(results: list[dict], same: dict[str, bool], costs: dict, counts: dict, preset: str) -> None:
    stage_names = ("fetch", "extract", "coreset", "calibrate", "index", "score", "metrics")

    def stage_tasks(r: dict) -> list[dict]:
        return [t for t in r["tasks"] if t["name"].split("-")[0] in stage_names]

    def busy_seconds(r: dict) -> float:
        return sum(t["end"] - t["start"] for t in stage_tasks(r))

    # Dask's cost, measured: per task (1 worker vs one process, same work, one at a time) and the cluster start
    # (first stage task, from the flow's start); the flow's own head and tail (MLflow logging) from one process.
    one_run, dask_one = results[0], results[1]
    task_overhead = (busy_seconds(dask_one) - busy_seconds(one_run)) / len(stage_tasks(dask_one))
    cluster_start = (min(t["start"] for t in stage_tasks(dask_one))
                     - min(t["start"] for t in stage_tasks(one_run)))
    flow_outside = one_run["wall_seconds"] - busy_seconds(one_run)
    measured = [c for c in costs if c in MVTEC_COUNTS]
    mean = {k: float(np.mean([costs[c][k] for c in measured])) for k in costs[measured[0]]}
    a = coreset_model(costs, counts)
    calibrate_share = float(np.mean([costs[c]["calibrate"] / costs[c]["coreset"] for c in measured]))

    def cpu_cost(_c: str, n_train: int, n_test: int, g_extract: float = 1, g_coreset: float = 1) -> dict:
        coreset = a * n_train ** 2
        return {**mean, "extract_per_image": mean["extract_per_image"] / g_extract,
                "score_per_image": mean["score_per_image"] / g_extract, "coreset": coreset / g_coreset,
                "calibrate": calibrate_share * coreset / g_coreset}

    lines = [
        "# Scale-out: full benchmark on one process, on 1 and on 2 Dask workers",
        "",
        f"Measured {datetime.now(UTC):%Y-%m-%d} on {platform.machine()}, {os.cpu_count()} cores, CPU only, "
        f"`{preset}` preset (EfficientNet-Lite0 offline weights, 224 px, 10 % greedy coreset, exact L2), "
        "one thread per process or worker (`PATCHCORE_THREADS=1`, `threads_per_worker=1`). Command: "
        "`.venv/bin/python bench/bench_scale.py`. Each configuration starts from an empty work dir (no stage "
        "reused); wall time includes the Prefect ephemeral server's flow set-up and, for Dask, the cluster start.",
        "",
        "| configuration | wall s | speed-up | CPU s: stages (workers or flow process) / Prefect server | "
        "peak RSS, all processes (MB) | peak RSS per worker (MB) | same results as one process |",
        "|---|---|---|---|---|---|---|",
    ]
    base = results[0]["wall_seconds"]
    for r in results:
        cpu = r["cpu_seconds"]
        stages = cpu["workers"] if r["workers"] else cpu["flow process"]
        lines.append(f"| {r['label']} | {r['wall_seconds']:.1f} | {base / r['wall_seconds']:.2f}x | "
                     f"{stages:.0f} / {cpu['prefect server']:.0f} (flow process {cpu['flow process']:.0f}) | "
                     f"{r['peak_total_mb']} | {', '.join(map(str, r['worker_peaks_mb'])) or '–'} | "
                     f"{'yes, bitwise' if same[r['label']] else 'NO'} |")
    lines += ["", "Metrics (identical in every configuration; image AUROC, pixel AUROC, AU-PRO):", ""]
    from tasks.tracking import markdown_table, results_table

    table = (markdown_table(results_table(results[0]["runs"])) if "runs" in results[0]
             else results[0]["metrics_table"])
    lines += [table, ""]
    lines += [
        "'Same results' compares, per category, metrics.json (every key but the timings), the image scores and "
        "the anomaly maps with `np.array_equal`: the stages are the same functions on the same shards whatever "
        "the runner, and the thread count per task is equal. (With another thread count per task the BLAS / "
        "oneDNN sums change order and scores move by about one ulp: keep `PATCHCORE_THREADS` fixed to compare.)",
        "",
        "## Where the time goes (2 workers)",
        "",
        "| stage | task runs | busy s (sum over tasks) | share |",
        "|---|---|---|---|",
    ]
    two = results[-1]["tasks"]
    per_config = []
    for r in results:
        sums: dict[str, float] = {}
        for t in r["tasks"]:
            sums[stage_of(t["name"])[0]] = sums.get(stage_of(t["name"])[0], 0.0) + t["end"] - t["start"]
        per_config.append(sums)
    stage_busy: dict[str, list[float]] = {}
    for t in two:
        stage = stage_of(t["name"])[0]
        stage_busy.setdefault(stage, []).append(t["end"] - t["start"])
    total = sum(sum(v) for v in stage_busy.values())
    for stage, v in sorted(stage_busy.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"| {stage} | {len(v)} | {sum(v):.1f} | {100 * sum(v) / total:.1f} % |")
    measured_counts = {c: counts[c] for c in costs}
    check = []
    for r in results[1:]:
        span, _ = simulate(measured_counts, lambda c, *_: costs[c], r["workers"], overhead=task_overhead)
        check.append((r["label"], span + cluster_start + flow_outside, r["wall_seconds"]))
    lines += [
        "",
        "Task seconds per stage in each configuration (sum over the stage's tasks):",
        "",
        "| stage | " + " | ".join(r["label"] for r in results) + " |",
        "|---|" + "---|" * len(results),
    ]
    for stage in sorted(per_config[0], key=lambda k: -per_config[0][k])[:8]:
        lines.append(f"| {stage} | " + " | ".join(f"{p.get(stage, 0):.1f}" for p in per_config) + " |")
    extract_ratio = ((per_config[1].get("extract-train-part", 0) + per_config[1].get("extract-test-part", 0))
                     / max(1e-9, per_config[0].get("extract-train-part", 0)
                           + per_config[0].get("extract-test-part", 0)))
    lines += [
        "",
        f"Extraction takes {extract_ratio:.1f}x the time on one Dask worker that it takes in the flow process "
        "(same tasks, one at a time). The cause was glibc's allocator: Dask starts workers with "
        "MALLOC_TRIM_THRESHOLD_=65536, which also freezes the mmap threshold at 128 KiB, so each activation "
        "buffer page-faulted; `runtime.tune_allocator` (mallopt: 64 MiB mmap, 256 MiB trim threshold) now runs in "
        "every process, workers included. bench/results/allocator.md measures one forward pass both ways.",
    ]
    lines += [
        "",
        "## What Dask costs here",
        "",
        f"Measured from the runs above: {task_overhead:.2f} s per task (Prefect task run + Dask round trip + "
        f"the worker's first imports, averaged over {len(stage_tasks(dask_one))} stage tasks), "
        f"{cluster_start:.1f} s to start the local cluster (worker processes importing torch, faiss, Prefect), "
        f"and {flow_outside:.1f} s of flow work outside the stages (MLflow logging, registration, the table). "
        "Replaying the measured tasks of these five categories with those costs:",
        "",
        "| configuration | model (s) | measured (s) |",
        "|---|---|---|",
        *[f"| {label} | {model:.0f} | {wall:.0f} |" for label, model, wall in check],
        "",
        "The model assumes each worker has a core of its own. On this 2-core machine two single-thread workers "
        "also share the cores with the flow process and the Prefect server (CPU seconds in the first table), "
        "so their tasks run slower than alone: the gap between model and measurement at 2 workers is that "
        "contention, and the 15-category figures below are for workers with a core (or GPU) each.",
        "",
        "## Model: a 15-category MVTec AD benchmark on N workers",
        "",
        "From the measured task times of the one-process run (one thread, mean of bottle and pill): fetch "
        f"{mean['fetch_per_image']:.3f} s, extraction {mean['extract_per_image']:.3f} s and scoring "
        f"{mean['score_per_image']:.3f} s per image, score merge and metrics "
        f"{mean['score_merge_per_image'] + mean['metrics_per_image']:.3f} s per test image, index "
        f"{mean['index']:.1f} s per category, the greedy coreset as {a:.3g} · n_train² s (it computes n_selected x "
        "n_patches distances, both proportional to n_train; coefficient from bottle and pill), and calibration "
        f"(a coreset without the held-out images, then their scores) as {calibrate_share:.2f} x the coreset. "
        "The 15 categories' train / test counts are "
        "MVTec AD's (3,629 / 1,725 images). The model replays the flow's task graph (a task per 32-image shard for "
        "extraction and scoring, one coreset task per category after its train shards) with list scheduling on "
        f"N single-task workers, each task {task_overhead:.2f} s longer for Dask (cluster start and the flow's "
        "MLflow logging not included).",
        "",
        "| N workers | makespan (min) | speed-up | busy time in coreset + calibrate | idle worker time |",
        "|---|---|---|---|---|",
    ]

    def coreset_share(busy: dict) -> float:
        return (busy.get("coreset", 0) + busy.get("calibrate", 0)) / sum(busy.values())

    one, _ = simulate(MVTEC_COUNTS, cpu_cost, 1, overhead=task_overhead)
    model_rows = []
    for n in (1, 2, 4, 8, 15, 30):
        span, busy = simulate(MVTEC_COUNTS, cpu_cost, n, overhead=task_overhead)
        idle = 1 - sum(busy.values()) / (n * span)
        model_rows.append({"workers": n, "makespan_s": span, "coreset_share": coreset_share(busy), "idle": idle})
        lines.append(f"| {n} | {span / 60:.1f} | {one / span:.2f}x | {100 * coreset_share(busy):.0f} % | "
                     f"{100 * idle:.0f} % |")
    biggest = max(MVTEC_COUNTS, key=lambda c: MVTEC_COUNTS[c][0])
    k = cpu_cost(biggest, *MVTEC_COUNTS[biggest])
    floor = (32 * k["extract_per_image"] + k["extract_finish"] + k["coreset"] + k["index"]
             + 32 * k["score_per_image"] + MVTEC_COUNTS[biggest][1] * (k["score_merge_per_image"]
                                                                       + k["metrics_per_image"]))
    lines += [
        "",
        f"The floor is the longest chain of one category: {biggest} ({MVTEC_COUNTS[biggest][0]} train images), one "
        f"extraction shard, its coreset ({k['coreset'] / 60:.1f} min), index, one score shard, merge and metrics: "
        f"{floor / 60:.1f} min. Extraction and scoring split into shards, but a category's greedy selection is "
        "one sequential task, so past the point where every worker holds a coreset the makespan stays at that "
        "floor and the added workers idle (last column).",
        "",
        "**GPU workers.** No GPU was lent to this session, so the GPU stage times are not measured here; the rows "
        "below divide the measured CPU stage times by assumed speed-ups (inputs, not results) to show how the same "
        "graph behaves when extraction and scoring get much faster than the coreset:",
        "",
        "| N GPU workers | extraction + scoring speed-up (assumed) | coreset + calibrate speed-up (assumed) | "
        "makespan (min) | busy time in coreset + calibrate |",
        "|---|---|---|---|---|",
    ]
    gpu_rows = []
    for g_extract, g_coreset in ((20, 5), (50, 20)):
        def gpu(c, n_train, n_test, ge=g_extract, gc=g_coreset):
            return cpu_cost(c, n_train, n_test, ge, gc)
        for n in (1, 2, 4, 8, 15):
            span, busy = simulate(MVTEC_COUNTS, gpu, n, overhead=task_overhead)
            gpu_rows.append({"extract_speedup": g_extract, "coreset_speedup": g_coreset, "workers": n,
                             "makespan_s": span, "coreset_share": coreset_share(busy)})
            lines.append(f"| {n} | {g_extract}x | {g_coreset}x | {span / 60:.2f} | "
                         f"{100 * coreset_share(busy):.0f} % |")
    shares = sorted({(r["extract_speedup"], round(100 * r["coreset_share"])) for r in gpu_rows})
    lines += [
        "",
        f"Where the time goes: on CPU workers {100 * model_rows[0]['coreset_share']:.0f} % of the busy time is in "
        "the two greedy selections (coreset and calibration); with the assumed GPU speed-ups "
        + " and ".join(f"{share} % ({g}x extraction)" for g, share in shares)
        + ". The rest is per-image work that shards, and the CPU-side merge, metrics and fetch.",
        "",
    ]
    report = REPO / "bench" / "results" / "scale.md"
    memory = "\n## Memory per stage"  # bench/bench_stage_memory.py's section, kept
    kept = report.read_text().split(memory, 1) if report.is_file() else []
    report.write_text("\n".join(lines) + (memory + kept[1] if len(kept) == 2 else ""))
    (REPO / "bench" / "results" / "scale.json").write_text(json.dumps({
        "configs": [{**{k: v for k, v in r.items() if k not in ("runs",)}, "metrics_table": table}
                    for r in results],
        "counts": counts, "preset": preset,
        "same_results": same, "costs": costs, "model": model_rows,
        "coreset_fit": {"a": a, "exponent": 2, "calibrate_share": calibrate_share},
        "gpu_model": gpu_rows,
    }, indent=1))
    print("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=["brick", "grass", "gravel", "bottle", "pill"])
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite scale.md from bench/results/scale.json without running anything")
    args = parser.parse_args()
    if args.report_only:
        saved = json.loads((REPO / "bench" / "results" / "scale.json").read_text())
        counts = {c: tuple(v) for c, v in saved["counts"].items()}
        write_report(saved["configs"], saved["same_results"], saved["costs"], counts, saved["preset"])
        return 0
    data = prepare_data(args.categories)
    results = [run_config(label, n, data, args.categories, args.preset) for label, n in CONFIGS]
    reference = outputs(results[0]["runs"])
    same = {r["label"]: identical(outputs(r["runs"]), reference) for r in results}
    counts = {c: MVTEC_COUNTS.get(c) or (len(list((data / c / "train" / "good").iterdir())),
                                         sum(len(list(d.iterdir())) for d in (data / c / "test").iterdir()))
              for c in args.categories}
    costs = per_category_costs(results[0]["tasks"], counts)
    write_report(results, same, costs, counts, args.preset)
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
