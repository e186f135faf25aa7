"""Issue #13: the `offline` preset beside the default Lite0 configuration, end to end, one process each.

Each configuration runs as its own child process (`patchcore evaluate`, the CLI the users run), so its peak
resident memory (`ru_maxrss`, in its metrics.json) is its own. Fit seconds: decode + backbone + coreset + index
over the train split; predict seconds per image: decode + backbone + search + maps over the test split.

    PATCHCORE_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/bench_preset.py \
        --categories bottle,pill
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = os.environ.get("PATCHCORE_MVTEC_ROOT", str(REPO.parent / "shared" / "data" / "mvtec_ad"))
PATCHCORE = str(REPO / ".venv" / "bin" / "patchcore")

CONFIGS = {
    "default (Lite0, 224 px, 10 %)": ["--backbone", "efficientnet_lite0"],
    "preset offline": ["--preset", "offline"],
}
TARGETS = {"bottle": (99.9, 98.6, 96.1), "pill": (96.0, 97.6, 94.1)}  # paper PatchCore-10 % (bottle image ≥ 99.9)


def run(category: str, name: str, flags: list[str], work: Path, threads: int) -> dict:
    out = work / f"{category}_{name.split()[0]}_{abs(hash(name)) % 10**6}"
    cmd = [PATCHCORE, "evaluate", "--data", DATA, "--category", category, "--out", str(out), *flags,
           "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"category": category, "config": name, "command": " ".join(cmd), "error": proc.stderr[-2000:]}
    metrics = json.loads((out / "metrics.json").read_text())
    return {"category": category, "config": name, "command": " ".join(cmd), "flags": " ".join(flags),
            "wall_seconds": wall,
            "load_after": os.getloadavg()[0], **{k: metrics[k] for k in (
                "image_auroc", "pixel_auroc", "au_pro", "fit_seconds", "predict_seconds_per_image", "peak_rss_mb",
                "n_train", "n_test")}}


def markdown(rows: list[dict], threads: int) -> str:
    lines = ["# Offline preset vs the default Lite0 configuration (issue #13)", "",
             f"Measured by `bench/bench_preset.py` on {time.strftime('%Y-%m-%d %H:%M %Z')}: {platform.machine()}, "
             f"{os.cpu_count()} cores shared with other jobs (times grow with their load), CPU only, "
             f"{threads} threads, one `patchcore evaluate` process per row (peak RSS is that process's).", "",
             "| category | configuration | image AUROC | pixel AUROC | AU-PRO | target (paper 10 %) | met | fit s "
             "| predict s/img | peak RSS MiB |", "|---|---|---:|---:|---:|---|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['category']} | {r['config']} | failed: {r['error'].splitlines()[-1]} |||||||")
            continue
        got = [100 * r[k] for k in ("image_auroc", "pixel_auroc", "au_pro")]
        target = TARGETS.get(r["category"])
        short = [] if target is None else [n for n, g, t in zip(("image", "pixel", "PRO"), got, target, strict=True)
                                            if round(g, 1) < t]
        met = "–" if target is None else ("yes" if not short else f"no ({', '.join(short)})")
        lines.append(f"| {r['category']} | {r['config']} | {got[0]:.1f} | {got[1]:.1f} | {got[2]:.1f} | "
                     f"{'–' if target is None else ' / '.join(f'{t:g}' for t in target)} | {met} | "
                     f"{r['fit_seconds']:.1f} | {r['predict_seconds_per_image']:.3f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Metrics compared with the targets at one decimal (as the paper prints them).", "", "Commands:", ""]
    lines += [f"- `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def merge_into_report(rows: list[dict], report_json: Path) -> None:
    """Put the measured rows into a paper report's results as its section 7 ("preset" experiment) and re-render
    the Markdown (`rebuild_report`: no recomputation). Earlier preset rows of the same categories are replaced."""
    sys.path.insert(0, str(REPO))
    from experiments.paper_report import rebuild_report

    saved = json.loads(report_json.read_text())
    cats = {r["category"] for r in rows}
    kept = [r for r in saved["rows"] if not (r.get("experiment") == "preset" and r["category"] in cats)]
    label = {"default (Lite0, 224 px, 10 %)": "base (10 %)"}
    for r in rows:
        if "error" in r:
            continue
        kept.append({"category": r["category"], "experiment": "preset", "method": label.get(r["config"], r["config"]),
                     "setting": f"`patchcore evaluate {r['flags']}`",
                     "image_auroc": r["image_auroc"], "pixel_auroc": r["pixel_auroc"], "au_pro": r["au_pro"],
                     "fit_seconds": r["fit_seconds"], "seconds_per_image": r["predict_seconds_per_image"],
                     "peak_rss_mb": r["peak_rss_mb"], "source": "bench/bench_preset.py (one process per row)"})
    saved["rows"] = kept
    report_json.write_text(json.dumps(saved, indent=1))
    rebuild_report(report_json)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--categories", default="bottle,pill")
    p.add_argument("--threads", type=int, default=int(os.environ.get("PATCHCORE_THREADS", "2")))
    p.add_argument("--work", default="/tmp/bench_preset_work")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "preset.md"))
    p.add_argument("--into-report", default=None,
                   help="also merge the rows into this paper report results JSON (section 7) and re-render it")
    p.add_argument("--from-json", action="store_true", help="measure nothing: reuse <out>.json")
    args = p.parse_args()
    if args.from_json:
        rows = json.loads(Path(args.out).with_suffix(".json").read_text())
        Path(args.out).write_text(markdown(rows, args.threads))
        if args.into_report:
            merge_into_report(rows, Path(args.into_report))
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for category in args.categories.split(","):
        for name, flags in CONFIGS.items():
            rows.append(run(category, name, flags, work, args.threads))
            print(json.dumps(rows[-1]), flush=True)
            Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1))
            Path(args.out).write_text(markdown(rows, args.threads))
    if args.into_report:
        merge_into_report(rows, Path(args.into_report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
