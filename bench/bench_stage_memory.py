"""Peak memory of each pipeline stage, one fresh process per (stage, category): what a worker must hold.

    .venv/bin/python bench/bench_stage_memory.py [--work bench/results/work/scale/one-process]
                                                 [--categories bottle pill]

Reads the stage results of a finished full-benchmark work dir (bench/bench_scale.py writes one), then for each
stage starts a new Python process that runs only that stage on those inputs, writing into a scratch work dir
(so nothing is reused), and reports the process's peak RSS (ru_maxrss) next to the RSS of a process that only
imported the same modules. Appends a table to bench/results/scale.md and writes bench/results/stage_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("imports only", "extract (one 32-image shard)", "coreset", "calibrate", "index",
          "score (all parts + merge)", "metrics")

CHILD = r"""
import json, resource, sys
from pathlib import Path
stage, work, scratch, category = sys.argv[1:5]
from patchcore_core.config import DetectorParams
from patchcore_core.runtime import Runtime
from patchcore_core.stages import calibrate, coreset, extract, fetch, index, metrics, score

def marker(pattern):
    [path] = sorted(Path(work).glob(pattern))
    return json.loads(path.read_text())["result"]

params = DetectorParams.model_validate_json(Path(work, "params.json").read_text())
rt = Runtime(device="cpu", num_threads=1)
fetched = fetch.FetchResult(**json.loads(Path(work, f"fetched-{category}.json").read_text()))
train = extract.SplitFeatures(**marker(f"features/*/dataset=*/category={category}/split=train/_SUCCESS.json"))
test = extract.SplitFeatures(**marker(f"features/*/dataset=*/category={category}/split=test/_SUCCESS.json"))
selected = coreset.CoresetResult(**marker(f"stages/{category}/coreset-*/_SUCCESS.json"))
calibrated = calibrate.CalibrationResult(**marker(f"stages/{category}/calibrate-*/_SUCCESS.json"))
model = index.ModelResult(**marker(f"stages/{category}/index-*/_SUCCESS.json"))
scores = score.ScoreResult(**marker(f"stages/{category}/score-*/_SUCCESS.json"))
if stage.startswith("extract"):
    extract.write_part(extract.plan(fetched, params, "train", scratch).shards[0], params, rt)
elif stage == "coreset":
    coreset.run(train, params, scratch, rt)
elif stage == "calibrate":
    calibrate.run(train, params, scratch, rt)
elif stage == "index":
    index.run(selected, params, scratch, rt, calibration=calibrated)
elif stage.startswith("score"):
    score.run(model, test, fetched, scratch, rt)
elif stage == "metrics":
    metrics.run(scores, fetched, model, scratch)
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(stage: str, work: Path, category: str) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_WAIT_POLICY": "PASSIVE", "TQDM_DISABLE": "1"}
        done = subprocess.run([sys.executable, "-c", CHILD, stage, str(work), scratch, category], env=env,
                              capture_output=True, text=True, timeout=3600)
    if done.returncode:
        raise SystemExit(f"{stage} / {category} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(REPO / "bench/results/work/scale/one-process"))
    parser.add_argument("--categories", nargs="+", default=["bottle", "pill"])
    args = parser.parse_args()
    work = Path(args.work)
    if not (work / "params.json").is_file():
        raise SystemExit(f"{work}: no params.json; run bench/bench_scale.py first")
    table = {stage: {c: round(measure(stage, work, c)) for c in args.categories} for stage in STAGES}
    (REPO / "bench/results/stage_memory.json").write_text(json.dumps(table, indent=1))
    lines = ["", "## Memory per stage (peak RSS of a process running only that stage, MB)", "",
             f"Command: `.venv/bin/python bench/bench_stage_memory.py` (inputs: {work.name}'s stage results, "
             "one thread, CPU). A long-lived worker holds more than a fresh process (its heap grows, it keeps the "
             "backbone): compare with the per-worker peak in the first table, and set the worker memory limit "
             "above both, times the tasks it runs at once.", "",
             "| stage | " + " | ".join(args.categories) + " |", "|---|" + "---|" * len(args.categories)]
    for stage, row in table.items():
        lines.append(f"| {stage} | " + " | ".join(str(row[c]) for c in args.categories) + " |")
    lines.append("")
    report = REPO / "bench/results/scale.md"
    text = report.read_text() if report.is_file() else ""
    marker = "\n## Memory per stage"
    report.write_text((text.split(marker)[0].rstrip("\n") + "\n" if marker in text else text) + "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
