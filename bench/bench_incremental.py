"""Incremental memory bank benchmark: full retrain vs fit on 80 % + `PatchCore.extend` with the last 20 %.

Per category (real MVTec AD data, efficientnet_lite0, default 224 px, 10 % greedy coreset), the train and test
patch features are extracted ONCE and reused, so the comparison is about selection (the backbone cost is
reported on its own line). The train images, in sorted listing order, are split into the first 80 % and the
last 20 %. Variants:

- full: `fit_features` on 100 % of the train patches (fit seconds);
- incremental: `fit_features` on the first 80 %, then `extend(features=...)` with the last 20 % (seconds of each).

For both: image AUROC, pixel AUROC and AU-PRO on the test split (`metrics.compute_metrics`, masks from
`data.load_masks` as `evaluation.py` does), bank size, the Jaccard overlap of the selected patch sets
identified by (train image, patch position) (the sampler is wrapped to record the indices it returns), and the
coverage radius: max over all train patches of the distance to the nearest bank row in the full feature space
(faiss exact search, float32). Times are compared as ratios measured in the same run. Calibration (held-out
thresholds), where the estimator has it, is switched off: it is not part of either selection.

    PATCHCORE_THREADS=2 OMP_WAIT_POLICY=PASSIVE nice -n 5 .venv/bin/python bench/bench_incremental.py
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from patchcore_core import PatchCore  # noqa: E402
from patchcore_core import sampler as sampler_module  # noqa: E402
from patchcore_core.data import list_category, load_masks  # noqa: E402
from patchcore_core.evaluation import markdown_table, peak_rss_mb  # noqa: E402
from patchcore_core.metrics import compute_metrics  # noqa: E402
from patchcore_core.sampler import GreedyCoresetSampler  # noqa: E402
from patchcore_core.scoring import score_stream  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("PATCHCORE_MVTEC_ROOT", str(REPO.parent / "shared" / "data" / "mvtec_ad"))
RESULTS = REPO / "bench" / "results"


class RecordingSampler(GreedyCoresetSampler):
    """The default greedy sampler, remembering the indices it returns (bank row → train patch mapping)."""

    def select(self, features):
        self.selected_ = super().select(features)
        return self.selected_

    def continue_select(self, selected, features):
        self.continued_ = super().continue_select(selected, features)
        return self.continued_


def make_model(threads: int, ratio: float, seed: int = 0) -> PatchCore:
    extra = {"calibration_fraction": 0.0} if "calibration_fraction" in PatchCore._get_param_names() else {}
    return PatchCore(backbone="efficientnet_lite0", coreset_ratio=ratio, device="cpu", num_threads=threads, seed=seed,
                     progress=False, sampler=RecordingSampler(ratio, seed=seed, device="cpu", progress=False), **extra)


def extract(model: PatchCore, paths: list[str]) -> tuple[np.ndarray, tuple[int, int], float]:
    """Patch features [n_images, h*w, D], the grid, seconds."""
    start = time.perf_counter()
    parts, grids = [], set()
    for feats, grid in model.iter_features(paths):
        parts.append(feats)
        grids.add(tuple(grid))
    (grid,) = grids
    return np.concatenate(parts), grid, time.perf_counter() - start


def evaluate(model: PatchCore, test: np.ndarray, labels: np.ndarray, masks: np.ndarray) -> dict:
    bs = model.batch_size
    scores, maps = score_stream(((None, test[i : i + bs]) for i in range(0, len(test), bs)),
                                model.score_patch_features, len(test), model.image_size)
    return compute_metrics(labels, scores, masks, maps)


def coverage(model: PatchCore, flat: np.ndarray, n_first: int) -> dict:
    """Distance of every train patch to its nearest bank row (full feature space): max (radius) and mean, over
    all patches and over the last-split patches only."""
    sq, _ = model.index_.search(flat, 1)
    d = np.sqrt(np.maximum(sq[:, 0].astype(np.float64), 0.0))
    return {"radius": float(d.max()), "mean": float(d.mean()), "radius_new": float(d[n_first:].max()),
            "mean_new": float(d[n_first:].mean())}


def warm_up(threads: int) -> None:
    """Load the numba kernels (compiled or from the cache) before anything is timed."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    s = GreedyCoresetSampler(0.1, progress=False)
    s.continue_select(x[s.select(x[:2000])], x[2000:])


def run_category(data: str, category: str, threads: int, ratio: float, split: float, limit: int | None,
                 repeats: int) -> dict:
    listing = list_category(data, category)
    train_paths = [s.path for s in listing.train][:limit]
    test_samples = listing.test[:: max(1, len(listing.test) // limit)][:limit] if limit else listing.test
    probe = make_model(threads, ratio)
    train, grid, t_train = extract(probe, train_paths)
    test, _, t_test = extract(probe, [s.path for s in test_samples])
    masks = load_masks(test_samples, probe.resize, probe.image_size, check_size=True)
    labels = np.array([s.label for s in test_samples])
    n_img, per_img, dim = train.shape
    flat = train.reshape(-1, dim)
    n_a = int(round(split * n_img))
    rows_a = n_a * per_img
    out = {"category": category, "n_train": n_img, "n_first": n_a, "n_last": n_img - n_a, "n_test": len(test),
           "grid": grid, "dim": dim, "extract_train_s": t_train, "extract_test_s": t_test}

    times: dict[str, list[tuple[float, float]]] = {"full": [], "fit80": [], "extend": [], "nearest": [],
                                                   "greedy": []}
    for _ in range(repeats):  # interleaved, so load drift hits every variant alike; selections are deterministic
        full = make_model(threads, ratio)
        times["full"].append(_timed(full.fit_features, flat, grid))
        inc = make_model(threads, ratio)
        times["fit80"].append(_timed(inc.fit_features, flat[:rows_a], grid))
        with _phase_timer(times):
            times["extend"].append(_timed(inc.extend, features=train[n_a:]))
    for key, values in times.items():
        out[f"{key}_s"] = _summary(values)
    out["full_fit_s"], out["inc_fit80_s"], out["inc_extend_s"] = (out[k]["median"] for k in ("full_s", "fit80_s",
                                                                                               "extend_s"))
    ids_full = full.sampler.selected_
    ids_inc = np.concatenate([inc.sampler.selected_, rows_a + inc.sampler.continued_])
    out["inc_added"] = len(inc.sampler.continued_)

    other = make_model(threads, ratio, seed=1)  # the selection noise of a plain refit: another seed
    start = time.perf_counter()
    other.fit_features(flat, grid)
    out["seed1_fit_s"] = time.perf_counter() - start
    ids_seed1 = other.sampler.selected_
    out["jaccard_seed1"] = _jaccard(ids_full, ids_seed1)

    for name, model, ids in (("full", full, ids_full), ("inc", inc, ids_inc), ("seed1", other, ids_seed1)):
        if not np.array_equal(model.memory_bank_, flat[ids]):  # the recorded mapping is the bank, row for row
            raise AssertionError(f"{category} {name}: recorded indices do not reproduce the memory bank")
        out[f"{name}_bank"] = len(ids)
        out[f"{name}_patches"] = model.n_train_patches_
        out[f"{name}_metrics"] = evaluate(model, test, labels, masks)
        out[f"{name}_cover"] = coverage(model, flat, rows_a)
    a, b = set(ids_full.tolist()), set(ids_inc.tolist())
    out["jaccard"] = len(a & b) / len(a | b)
    out["jaccard_first"] = _jaccard(ids_full[ids_full < rows_a], ids_inc[ids_inc < rows_a])
    out["jaccard_last"] = _jaccard(ids_full[ids_full >= rows_a], ids_inc[ids_inc >= rows_a])
    out["full_from_last"] = int((ids_full >= rows_a).sum())
    return out


def _timed(fn, *args, **kwargs) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(values: list[tuple[float, float]]) -> dict:
    walls = [w for w, _ in values]
    return {"median": float(np.median(walls)), "min": min(walls), "max": max(walls),
            "cpu_median": float(np.median([c for _, c in values])), "n": len(values)}


@contextlib.contextmanager
def _phase_timer(times: dict):
    """Time the two kernels inside `extend` (exact nearest-bank distances, greedy continuation) by wrapping the
    sampler module's functions for the duration of one call."""
    saved = {name: getattr(sampler_module, name) for name in ("_nearest_numba", "_greedy_numba")}

    def wrap(key, fn):
        def timed(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.process_time()
            result = fn(*args, **kwargs)
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
            return result
        return timed

    sampler_module._nearest_numba = wrap("nearest", saved["_nearest_numba"])
    sampler_module._greedy_numba = wrap("greedy", saved["_greedy_numba"])
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(sampler_module, name, fn)


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    a, b = set(x.tolist()), set(y.tolist())
    return len(a & b) / max(1, len(a | b))


def markdown(results: list[dict], meta: dict) -> str:
    lines = [
        "# Incremental memory bank: full retrain vs fit on 80 % + `extend` with 20 %",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['machine']}, {os.cpu_count()} cores visible, {meta['threads']} threads "
        f"(torch/faiss), CPU only; numba kernels single-threaded. Load average at start {meta['load_start']}, "
        f"at end {meta['load_end']} (other jobs shared the cores: absolute times are pessimistic, compare the "
        f"ratios, measured in the same run). Wall time of the whole run {meta['wall']:.0f} s, peak RSS "
        f"{meta['rss']:.0f} MiB.",
        "",
        "Settings: efficientnet_lite0 (ImageNet weights), resize 256, crop 224, greedy coreset ratio "
        f"{meta['ratio']}, projection 128, seed 0, faiss Flat, l2 distance; calibration off. Train images in "
        f"sorted listing order: first {int(meta['split'] * 100)} % / last {100 - int(meta['split'] * 100)} % "
        "(rounded to whole images).",
        "",
        "Features were extracted once per category and reused by both variants (backbone cost, not in any "
        "time below):",
        "",
    ]
    lines += [f"- {r['category']}: {r['n_train']} train images ({r['n_train'] * r['grid'][0] * r['grid'][1]:,} "
              f"patches of {r['dim']} dims, grid {r['grid'][0]}x{r['grid'][1]}) in {r['extract_train_s']:.1f} s, "
              f"{r['n_test']} test images in {r['extract_test_s']:.1f} s" for r in results]
    header = ["category", "variant", "train images", "selection s", "bank rows", "image AUROC", "pixel AUROC",
              "AU-PRO", "coverage radius (all)", "radius (last 20 %)", "mean NN dist (all)", "Jaccard vs full"]
    rows = []
    for r in results:
        for name, label, secs in (
            ("full", "full retrain (100 %)", f"{r['full_fit_s']:.2f} (fit)"),
            ("inc", f"fit 80 % + extend 20 % ({r['n_first']} + {r['n_last']} img)",
             f"{r['inc_fit80_s']:.2f} (fit) + {r['inc_extend_s']:.2f} (extend)"),
            ("seed1", "full retrain, seed 1 (baseline of selection noise)", f"{r['seed1_fit_s']:.2f} (fit)"),
        ):
            m, c = r[f"{name}_metrics"], r[f"{name}_cover"]
            rows.append([r["category"], label, r["n_train"], secs, f"{r[f'{name}_bank']:,}",
                         f"{m['image_auroc']:.4f}", f"{m['pixel_auroc']:.4f}", f"{m['au_pro']:.4f}",
                         f"{c['radius']:.3f}", f"{c['radius_new']:.3f}", f"{c['mean']:.3f}",
                         {"full": "1", "inc": f"{r['jaccard']:.3f}", "seed1": f"{r['jaccard_seed1']:.3f}"}[name]])
    lines += ["", markdown_table(header, rows), ""]
    ratio_header = ["category", "extend / full fit", "(fit 80 % + extend) / full fit", "extend / fit 80 %",
                    "rows added by extend", "full bank rows from the last 20 %", "Jaccard first 80 % part",
                    "Jaccard last 20 % part", "radius incremental / full"]
    ratio_rows = [[r["category"], f"{r['inc_extend_s'] / r['full_fit_s']:.3f}",
                   f"{(r['inc_fit80_s'] + r['inc_extend_s']) / r['full_fit_s']:.3f}",
                   f"{r['inc_extend_s'] / r['inc_fit80_s']:.3f}", f"{r['inc_added']:,}", f"{r['full_from_last']:,}",
                   f"{r['jaccard_first']:.3f}", f"{r['jaccard_last']:.3f}",
                   f"{r['inc_cover']['radius'] / r['full_cover']['radius']:.3f}"] for r in results]
    lines += ["Ratios of median wall times (same run):", "", markdown_table(ratio_header, ratio_rows), ""]
    time_header = ["category", "step", "wall s median", "wall s min", "wall s max", "CPU s median", "repeats"]
    time_rows = []
    for r in results:
        for key, label in (("full_s", "full retrain: fit_features (100 %)"), ("fit80_s", "fit_features (80 %)"),
                           ("extend_s", "extend (20 %), total"), ("nearest_s", "  of which: nearest-bank distances"),
                           ("greedy_s", "  of which: greedy continuation")):
            t = r[key]
            time_rows.append([r["category"], label, f"{t['median']:.2f}", f"{t['min']:.2f}", f"{t['max']:.2f}",
                              f"{t['cpu_median']:.2f}", t["n"]])
    lines += ["Selection times, interleaved repetitions (the table above shows the medians):", "",
              markdown_table(time_header, time_rows), ""]
    lines += [
        "- *selection s*: `fit_features` = JL projection + greedy coreset (numba pruned kernel) + faiss index; "
        "`extend(features=...)` = projection of bank and new patches with the same seeded matrix + exact "
        "nearest-bank distances (pruned numba kernel) + greedy continuation + index rebuild.",
        "- *Jaccard*: |A ∩ B| / |A ∪ B| of the selected patches, each identified by (train image, patch position); "
        "the sampler was wrapped to record the indices it returned, and the recorded rows were checked to equal "
        "the memory bank row for row. The *seed 1* row is a second full retrain with another projection and "
        "start seed: the overlap two plain refits have, the yardstick for the incremental one.",
        "- *coverage radius*: max over all train patches (both splits) of the distance to the nearest bank row, "
        "full feature space (faiss exact float32 search); *radius (last 20 %)* takes the max over the last split "
        "only; *mean NN dist*: the mean over all train patches.",
        "- Both banks keep int(0.1·N) rows of what they selected from: full k = int(0.1·N_all); incremental "
        "int(0.1·N_80) + int(0.1·N_20).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--categories", default="bottle,pill")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("PATCHCORE_THREADS", "2")))
    parser.add_argument("--ratio", type=float, default=0.1)
    parser.add_argument("--split", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of the fits and the extend")
    parser.add_argument("--limit", type=int, default=None,
                        help="first N train and N evenly spaced test images (smoke runs only)")
    parser.add_argument("--out", default=str(RESULTS / "incremental.md"))
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    load_start = " ".join(f"{v:.2f}" for v in os.getloadavg())
    warm_up(args.threads)
    results = []
    for category in args.categories.split(","):
        results.append(run_category(args.data, category, args.threads, args.ratio, args.split, args.limit,
                                    args.repeats))
        print({k: v for k, v in results[-1].items() if not k.endswith("_metrics")}, flush=True)
    env = f"PATCHCORE_THREADS={os.environ.get('PATCHCORE_THREADS', '')} OMP_WAIT_POLICY=PASSIVE nice -n 5 "
    meta = {"command": env + ".venv/bin/python bench/bench_incremental.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": platform.processor() or platform.machine(), "threads": args.threads,
            "load_start": load_start, "load_end": " ".join(f"{v:.2f}" for v in os.getloadavg()),
            "wall": time.perf_counter() - t0, "rss": peak_rss_mb(), "ratio": args.ratio, "split": args.split}
    text = markdown(results, meta)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
