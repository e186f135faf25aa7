"""What the allocator tuning costs the main job in one process: `python -m flows.demo`, tuned and not.

    .venv/bin/python bench/bench_demo_allocator.py

Runs the demo (default runner, embedded defaults) three times in fresh work dirs, one after another: with
`tune_allocator()` (as users run it), with PATCHCORE_TUNE_MALLOC=0 (glibc's defaults), and with the same 64 MiB
mmap threshold but a 64 MiB trim threshold (glibc's own MALLOC_*_ variables). Records wall time and peak RSS of
the demo process (`ru_maxrss` of that child) and its results table. Writes bench/results/demo_allocator.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20
SETTINGS = [("tune_allocator() (mmap 64 MiB, trim 256 MiB)", {}),
            ("glibc defaults (PATCHCORE_TUNE_MALLOC=0)", {"PATCHCORE_TUNE_MALLOC": "0"}),
            ("mmap 64 MiB, trim 64 MiB", {"MALLOC_MMAP_THRESHOLD_": str(64 * MIB),
                                          "MALLOC_TRIM_THRESHOLD_": str(64 * MIB)})]

MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
print(json.dumps({"rc": done.returncode, "wall": time.perf_counter() - start, "stdout": done.stdout,
                  "stderr": done.stderr[-3000:],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def run_demo(extra: dict[str, str], work: Path) -> dict:
    """One demo in a fresh measuring process, so that the peak RSS is that demo's alone."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(extra)
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "PATCHCORE_WORK_DIR"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "flows.demo", "--work-dir",
                           str(work)], env=env, capture_output=True, text=True, cwd=REPO, timeout=1800)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"]:
        raise SystemExit(result["stderr"])
    return result


def table_rows(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith("| ") and not line.startswith("| category")]


def main() -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, extra) in enumerate(SETTINGS):
            result = run_demo(extra, Path(tmp) / f"demo-{i}")
            rows.append((label, result))
            print(f"{label}: {result['wall']:.1f} s, {result['peak_rss_mb']:,.0f} MB", flush=True)
    tables = {tuple(table_rows(r["stdout"])) for _, r in rows}
    lines = ["# Allocator tuning and the main job: `python -m flows.demo` in one process", "",
             "Command: `.venv/bin/python bench/bench_demo_allocator.py` (the demo with its embedded defaults, default "
             "runner, fresh work dir each, one after another; peak RSS of the demo process).", "",
             "| allocator | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {label} | {r['wall']:.1f} | {r['peak_rss_mb']:,.0f} |" for label, r in rows]
    lines += ["", f"Results tables: {'identical' if len(tables) == 1 else 'DIFFER'} across the settings.", ""]
    lines += [line for line in rows[0][1]["stdout"].splitlines() if line.startswith("|")]
    lines.append("")
    (REPO / "bench" / "results" / "demo_allocator.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
