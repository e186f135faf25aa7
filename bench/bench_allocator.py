"""Why extraction was slower on Dask workers, and what `runtime.tune_allocator` changes: one backbone forward pass.

    .venv/bin/python bench/bench_allocator.py

For each of: the flow process, a `distributed.LocalCluster` worker (which starts with Dask's
MALLOC_TRIM_THRESHOLD_=65536), each with glibc's defaults and with `tune_allocator()`, a fresh process runs
EfficientNet-Lite0 on 8 batches of 8 random 224 px images (one thread) and reports wall and CPU seconds (user,
system) and minor page faults of that thread. Writes bench/results/allocator.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

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
    (REPO / "bench" / "results" / "allocator.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
