"""Paper-style report on MVTec AD: PatchCore vs SPADE vs PaDiM, subsampling, search, timing and ablations.

    .venv/bin/python bench/paper_report.py                       # bottle, efficientnet_lite0 (offline weights)
    .venv/bin/python bench/paper_report.py --categories all --backbone wide_resnet50_2 --device cuda

Writes bench/results/paper_report.md and its figures under bench/results/paper_report_figures/ (see
`experiments.paper_report` for what is run and how features are reused; docs/paper_report.md for the modules).
Detector flags (--backbone, --resize, ...) override `ReportConfig.base`, i.e. `patchcore_core.config.DetectorParams`
defaults; the other flags are the grid's own settings.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

# Waiting OpenMP threads sleep instead of spinning. libgomp's default spin-wait turns every small parallel
# region into a stall when other processes share the cores: measured 20.6 s vs 1.2 s for the same SPADE
# distance blocks with 2 threads on a loaded 2-core machine. Must be set before torch/faiss load libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = os.environ.get("PATCHCORE_MVTEC_ROOT", str(REPO.parent / "shared" / "data" / "mvtec_ad"))


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(",") if x)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x)


def _int_or_none(text: str) -> int | None:
    return None if text.lower() == "none" else int(text)


def _names(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


# Detector flags: (flag, DetectorParams field, argparse type, help). A flag not given sets nothing: the field keeps
# the report's base value (backbone efficientnet_lite0) or the schema default.
DETECTOR_FLAGS = (
    ("--backbone", "backbone", str, "backbone (default: efficientnet_lite0, offline weights)"),
    ("--weights", "weights", str, "local backbone weights file"),
    ("--layers", "layers", _names, "PatchCore layers, comma-separated hierarchy layer names (default: backbone's)"),
    ("--patch-size", "patch_size", int, "PatchCore neighbourhood P (default 3)"),
    ("--resize", "resize", _int_or_none, "shorter side before the centre crop, or none (default 256)"),
    ("--image-size", "image_size", int, "centre crop (default 224)"),
    ("--k-images", "k_images", int, "SPADE's K nearest train images (default 50)"),
    ("--n-features", "n_features", int, "PaDiM's channels kept (default: backbone's)"),
    ("--seed", "seed", int, "seed of projections, random subsets and channel choices (default 0)"),
    ("--batch-size", "batch_size", int, "images per backbone batch (default 16)"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=DEFAULT_DATA, help="MVTec-layout root (local path, file:// or s3://)")
    p.add_argument("--categories", default="bottle", help="comma-separated categories, or 'all'")
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "paper_report.md"))
    p.add_argument("--figures-dir", default=None, help="default: <out without .md>_figures next to the report")
    p.add_argument("--tables-dir", default=None, help="also write every table as CSV here")
    p.add_argument("--coreset-ratios", type=_floats, default=(0.25, 0.1, 0.01))
    p.add_argument("--ablation-ratio", type=float, default=0.01,
                   help="coreset ratio of the patch-size / layer / image-size ablations")
    p.add_argument("--image-sizes", type=_ints, default=(224, 280, 320))
    p.add_argument("--lowshot-sizes", type=_ints, default=(1, 5, 10, 16, 50))
    p.add_argument("--experiments", default=None,
                   help="comma-separated subset of: main, subsampling, search, timing, reweighting, patch_size, "
                        "layers, image_size, lowshot, spade_layers (default: all)")
    p.add_argument("--timing-images", type=int, default=16)
    p.add_argument("--presets", type=_names, default=(),
                   help="named presets (patchcore_core.config.PRESETS) run end to end beside the base (section 7)")
    p.add_argument("--preset", default=None,
                   help="take the report's base detector settings from this preset (its coreset ratio, method, "
                        "index and eq. 7 stay the grid's); detector flags below override it")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default $PATCHCORE_THREADS)")
    p.add_argument("--quiet", action="store_true")
    detector = p.add_argument_group("detector settings (override ReportConfig.base)")
    for flag, name, kind, text in DETECTOR_FLAGS:
        detector.add_argument(flag, dest=name, type=kind, default=argparse.SUPPRESS, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    sys.path.insert(0, str(REPO))
    from experiments.paper_report import EXPERIMENTS, run_paper_report
    from patchcore_core.data import list_categories

    categories = (list_categories(args.data) if args.categories == "all"
                  else [c for c in args.categories.split(",") if c])
    base = {name: getattr(args, name) for _, name, _, _ in DETECTOR_FLAGS if hasattr(args, name)}
    if args.preset:
        from experiments.paper_report.common import GRID_OWNED
        from patchcore_core.config import preset_values

        base = {**{k: v for k, v in preset_values(args.preset).items() if k not in GRID_OWNED}, **base}
    overrides = dict(
        base=base, coreset_ratios=args.coreset_ratios, ablation_ratio=args.ablation_ratio, image_sizes=args.image_sizes,
        lowshot_sizes=args.lowshot_sizes, timing_images=args.timing_images, device=args.device,
        num_threads=args.threads, presets=tuple(args.presets),
        experiments=tuple(args.experiments.split(",")) if args.experiments else EXPERIMENTS,
    )
    if 0.1 in args.coreset_ratios:
        overrides["heatmap_ratio"] = 0.1
    else:
        overrides["heatmap_ratio"] = args.coreset_ratios[0]
    out = Path(args.out)
    start = time.perf_counter()
    result = run_paper_report(args.data, categories, out.parent, report_name=out.name,
                              figures_dir=args.figures_dir, **overrides)
    if args.tables_dir:
        result.write_tables(args.tables_dir)
    print(f"report: {result.report_path}")
    for path in result.figure_paths:
        print(f"figure: {path} ({path.stat().st_size / 1024:.0f} KB)")
    for cat, ok in result.acceptance.items():
        print(f"{cat}: PatchCore image AUROC >= PaDiM and >= SPADE at every ratio: {'yes' if ok else 'NO'}")
    print(f"wall time: {time.perf_counter() - start:.0f} s on {result.device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
