"""Why extraction was slower on Dask workers, and what `runtime.tune_allocator` changes: one backbone forward pass.

    .venv/bin/python bench/bench_allocator.py

For each of: the flow process, a `distributed.LocalCluster` worker (which starts with Dask's
MALLOC_TRIM_THRESHOLD_=65536), each with glibc's defaults and with `tune_allocator()`, a fresh process runs
EfficientNet-Lite0 on 8 batches of 8 random 224 px images (one thread) and reports wall and CPU seconds (user,
system) and minor page faults of that thread. Then the trim-threshold sweep: `patchcore evaluate` on real bottle
(offline and fast presets, 2 threads), in a fresh process per setting, with glibc's defaults, with
`tune_allocator()`, and with the same 64 MiB mmap threshold but a smaller trim threshold (set through glibc's own
MALLOC_*_ environment variables, which `tune_allocator` leaves alone): fit seconds, predict seconds per image and
peak RSS. Writes bench/results/allocator.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "mvtec_ad"
MIB = 2**20


def glibc(mmap_mib: int, trim_mib: int) -> dict[str, str]:
    """glibc's own environment variables for these thresholds (tune_allocator then leaves the allocator alone)."""
    return {"MALLOC_MMAP_THRESHOLD_": str(mmap_mib * MIB), "MALLOC_TRIM_THRESHOLD_": str(trim_mib * MIB)}


# (label, environment) of each allocator setting in the sweep; {}: tune_allocator() itself, as users run it
SWEEP = [("glibc defaults", {"PATCHCORE_TUNE_MALLOC": "0"}),
         ("mmap 64 MiB, trim 16 MiB", glibc(64, 16)),
         ("mmap 64 MiB, trim 64 MiB", glibc(64, 64)),
         ("tune_allocator() (mmap 64 MiB, trim 256 MiB)", {})]

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, sys.argv[2])
where = sys.argv[1]

def forward():
    import torch
    from patchcore_core.baselines import make_detector
    from patchcore_core.runtime import tune_allocator
    if os.environ.get("PATCHCORE_TUNE_MALLOC") != "0":
        tune_allocator()
    torch.set_num_threads(1)
    model = make_detector("patchcore", strict=False, backbone="efficientnet_lite0", device="cpu", progress=False)
    x = torch.rand(8, 3, 224, 224)
    extractor = model._extractor()
    with torch.no_grad():
        extractor(x)
        r0, t0, c0 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter(), time.thread_time()
        for _ in range(8):
            extractor(x)
        r1, t1, c1 = resource.getrusage(resource.RUSAGE_THREAD), time.perf_counter(), time.thread_time()
    return {"wall": t1 - t0, "cpu": c1 - c0, "user": r1.ru_utime - r0.ru_utime, "system": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt, "trim_env": os.environ.get("MALLOC_TRIM_THRESHOLD_")}

if __name__ == "__main__":
    if where == "process":
        print(json.dumps(forward()))
    else:
        from distributed import Client, LocalCluster
        with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                          env=dict(os.environ)) as cluster, Client(cluster) as client:
            print(json.dumps(client.submit(forward, pure=False).result()))
"""


def trim_sweep() -> list[tuple[str, str, dict]]:
    """`patchcore evaluate` on bottle per preset and allocator setting, each in a fresh process."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in ("offline", "fast"):
            for i, (label, extra) in enumerate(SWEEP):
                env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                env.update({"OMP_WAIT_POLICY": "PASSIVE", **extra})
                out = Path(tmp) / f"{preset}-{i}"
                done = subprocess.run([sys.executable, "-m", "patchcore_core.cli", "evaluate", "--data", str(DATA),
                                       "--category", "bottle", "--preset", preset, "--threads", "2", "--quiet",
                                       "--out", str(out)], env=env, capture_output=True, text=True, timeout=1200,
                                      cwd=REPO)
                if done.returncode:
                    raise SystemExit(done.stderr[-3000:])
                metrics = json.loads((out / "metrics.json").read_text())
                rows.append((preset, label, metrics))
                print(preset, label, {k: metrics[k] for k in ("fit_seconds", "predict_seconds_per_image",
                                                               "peak_rss_mb", "image_auroc")}, flush=True)
    return rows


def main() -> int:
    rows = []
    for where in ("process", "dask worker"):
        for tuned in (False, True):
            env = {**os.environ, "PATCHCORE_TUNE_MALLOC": "1" if tuned else "0", "OMP_WAIT_POLICY": "PASSIVE"}
            done = subprocess.run([sys.executable, "-c", CHILD, where, str(REPO)], env=env, capture_output=True,
                                  text=True, timeout=600, cwd=REPO)
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append((where, tuned, result))
            print(where, tuned, result, flush=True)
    sweep = trim_sweep()
    lines = ["# Allocator: one backbone forward pass in the flow process and on a Dask worker", "",
             "Command: `.venv/bin/python bench/bench_allocator.py` (EfficientNet-Lite0, 8 batches of 8 x 224 px, one "
             "thread, CPU; figures of the thread that ran them).", "",
             "| where | allocator | wall s | CPU s | user s | system s | minor page faults |",
             "|---|---|---|---|---|---|---|"]
    for where, tuned, r in rows:
        label = ("tune_allocator()" if tuned else "glibc defaults" if r["trim_env"] is None
                 else f"glibc, MALLOC_TRIM_THRESHOLD_={r['trim_env']} (Dask's)")
        lines.append(f"| {where} | {label} | {r['wall']:.2f} | {r['cpu']:.2f} | {r['user']:.2f} | "
                     f"{r['system']:.2f} | {r['minor_faults']:,} |")
    lines += ["", "Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536; setting it also freezes glibc's mmap "
              "threshold at 128 KiB, so every activation buffer is a fresh mmap that page-faults on first touch. "
              "`patchcore_core.runtime.tune_allocator` (called by `configure_threads` and by every detector) sets a "
              "64 MiB mmap threshold and a 256 MiB trim threshold with `mallopt`; PATCHCORE_TUNE_MALLOC=0 turns it "
              "off.", ""]
    lines += ["## Trim threshold: a whole fit and predict", "",
              "Command: the same script; each row a fresh `patchcore evaluate --data ../shared/data/mvtec_ad "
              "--category bottle --preset P --threads 2 --quiet` with the allocator set as labelled. Peak RSS is "
              "the process's own (`metrics.json`).", "",
              "| preset | allocator | fit s | predict s/image | peak RSS MB | image AUROC / pixel AUROC / AU-PRO |",
              "|---|---|---|---|---|---|"]
    for preset, label, m in sweep:
        lines.append(f"| {preset} | {label} | {m['fit_seconds']:.1f} | {m['predict_seconds_per_image']:.3f} | "
                     f"{m['peak_rss_mb']:,.0f} | {m['image_auroc']:.4f} / {m['pixel_auroc']:.4f} / "
                     f"{m['au_pro']:.4f} |")
    lines.append("")
    for preset in dict.fromkeys(p for p, _, _ in sweep):
        runs = [m for p, _, m in sweep if p == preset]
        fit, rss = [m["fit_seconds"] for m in runs], [m["peak_rss_mb"] for m in runs]
        same = len({(m["image_auroc"], m["pixel_auroc"], m["au_pro"]) for m in runs}) == 1
        lines.append(f"- {preset}: fit seconds span {min(fit):.1f}-{max(fit):.1f} ({max(fit) / min(fit) - 1:.0%} "
                     f"apart), peak RSS {min(rss):,.0f}-{max(rss):,.0f} MB ({max(rss) - min(rss):,.0f} MB apart) "
                     f"over the {len(runs)} settings; metrics {'identical' if same else 'DIFFER'}.")
    lines.append("")
    (REPO / "bench" / "results" / "allocator.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
