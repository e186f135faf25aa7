"""`patchcore` command line: fit, predict, evaluate, demo-data.

Every command checks its settings (the schema in patchcore_core.config) and then every input image's header
before any heavy work; a problem is one line on stderr naming the setting or file, with exit code 2.
Output that other programs read is Parquet or JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from patchcore_core.config import add_cli_options, from_cli, validate_params
from patchcore_core.errors import PatchCoreError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Every detector setting of the one schema (patchcore_core.config), plus the device."""
    add_cli_options(p, groups=("method", "features", "coreset", "model", "baseline", "runtime"))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=None, help="torch/faiss threads (default: all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out unusable images (listed with their reasons in the outputs) instead of stopping")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="largest image accepted, in pixels, checked from the header (default 50000000; "
                        "$PATCHCORE_MAX_IMAGE_PIXELS)")


def _runtime_checks(args: argparse.Namespace) -> None:
    """Runtime options, checked before any I/O: threads, device, pixel limit."""
    import os

    from patchcore_core.data import max_image_pixels
    from patchcore_core.runtime import configure_threads, resolve_device

    if args.max_pixels is not None:  # checked, then handed to the image checks through the environment
        os.environ["PATCHCORE_MAX_IMAGE_PIXELS"] = str(max_image_pixels(args.max_pixels))
    max_image_pixels()
    configure_threads(args.threads)
    if getattr(args, "device", None):
        resolve_device(args.device)


def _add_dataset_options(p: argparse.ArgumentParser, category_help: str, out_help: str) -> None:
    """--data/--category/--out, then every setting and the runtime options (fit and evaluate)."""
    p.add_argument("--data", required=True, help="MVTec-layout root: local path, file:// or s3://bucket/prefix")
    p.add_argument("--category", required=True, help=category_help)
    p.add_argument("--out", required=True, help=out_help)
    _add_model_options(p)
    _add_runtime_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="patchcore", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    fit = sub.add_parser("fit", help="fit PatchCore on a category's nominal train images and save the model")
    _add_dataset_options(fit, "a category name", "model directory to write")

    predict = sub.add_parser("predict", help="score images with a saved model")
    predict.add_argument("--model", required=True)
    predict.add_argument("--images", required=True, nargs="+", help="image files or folders of images")
    predict.add_argument("--out", required=True)
    predict.add_argument("--device", default=None)
    predict.add_argument("--batch-size", type=int, default=None)
    predict.add_argument("--no-maps", action="store_true", help="write predictions.parquet only (no masks/heatmaps)")
    _add_runtime_options(predict)

    ev = sub.add_parser("evaluate", help="fit (or load) and evaluate on a category's test split")
    ev.add_argument("--model", default=None, help="evaluate this saved model instead of fitting one")
    _add_dataset_options(ev, "a category name, or 'all' for every category found", "folder for the results")

    demo = sub.add_parser("demo-data", help="write the embedded demo dataset (MVTec layout)")
    demo.add_argument("--out", required=True)
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _model_from_args(args: argparse.Namespace):
    """An unfitted detector of the validated settings; settings a method does not take are ignored."""
    from patchcore_core.baselines import make_detector

    params = from_cli(args)
    return make_detector(params.method, strict=False, **params.estimator_params(), device=args.device,
                         num_threads=args.threads, progress=not args.quiet)


def _write_json(path: Path, value) -> None:
    from patchcore_core.artifacts import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(value, indent=2))


def expand_images(paths: list[str]) -> list[str]:
    """Files as given, folders expanded to their image files (sorted); a missing path is an error."""
    out: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise PatchCoreError(f"--images folder {path} holds no images ({sorted(IMAGE_SUFFIXES)})")
            out.extend(found)
        elif path.is_file() or "://" in raw:
            out.append(raw)
        else:
            raise PatchCoreError(f"--images path {raw} does not exist")
    return out


def cmd_fit(args: argparse.Namespace) -> int:
    from patchcore_core.data import list_category, screen_images

    model = _model_from_args(args)  # settings first: a bad value fails before any I/O
    _runtime_checks(args)
    listing = list_category(args.data, args.category, need_test=False)  # fitting needs train/good only
    paths, skipped = screen_images([s.path for s in listing.train], args.skip_bad)
    if not paths:
        raise PatchCoreError(f"{args.data}/{args.category}: no usable train image (all {len(skipped)} skipped)")
    model.fit(paths)
    model.save(args.out)
    if skipped:
        _write_json(Path(args.out) / "skipped_inputs.json", skipped)
    print(f"saved {type(model).__name__} model to {args.out}" + (f" ({len(skipped)} bad images skipped, listed in "
                                                                  "skipped_inputs.json)" if skipped else ""))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Score images with a saved model: predictions.parquet (score, threshold, decision), masks/, heatmaps/."""
    from patchcore_core.baselines import load_detector
    from patchcore_core.data import screen_images
    from patchcore_core.prediction import write_predictions

    batch_size = validate_params(batch_size=args.batch_size).batch_size if args.batch_size is not None else None
    _runtime_checks(args)
    model = load_detector(args.model, device=args.device)
    model.set_params(progress=not args.quiet, **({"batch_size": batch_size} if batch_size else {}))
    images, skipped = screen_images(expand_images(args.images), args.skip_bad)
    if not images:
        raise PatchCoreError(f"no usable image among the {len(skipped)} given (all skipped)")
    scores, maps = model.predict(images)
    out = Path(args.out)
    write_predictions(out, model, images, scores, maps, errors=skipped,
                      model_fingerprint=getattr(model, "model_fingerprint_", ""), masks_and_heatmaps=not args.no_maps)
    if skipped:
        _write_json(out / "skipped_inputs.json", skipped)
    threshold = getattr(model, "threshold_", None)
    for path, score in zip(images, scores, strict=True):  # JSON lines: any file name survives
        decision = None if threshold is None else bool(score >= threshold)
        print(json.dumps({"path": path, "score": float(score), "is_anomalous": decision}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate one category, or every one with `--category all`; a failed category does not stop the others
    and is reported at the end (exit code 1)."""
    from patchcore_core.artifacts import atomic_write
    from patchcore_core.baselines import load_detector
    from patchcore_core.data import list_categories
    from patchcore_core.evaluation import evaluate_category, summary_table

    template = None if args.model else _model_from_args(args)  # settings first: fail before any I/O
    _runtime_checks(args)
    categories = list_categories(args.data) if args.category == "all" else [args.category]
    if not categories:
        raise PatchCoreError(f"--data {args.data} holds no MVTec-layout category (no <category>/train/good)")
    rows, failed = [], {}
    for category in categories:
        out = Path(args.out) / category if args.category == "all" else Path(args.out)
        try:
            if args.model:
                model, fit = load_detector(args.model, device=None if args.device == "auto" else args.device), False
            else:
                from sklearn.base import clone

                model, fit = clone(template), True
            result = evaluate_category(model, args.data, category, out, fit=fit, skip_bad=args.skip_bad)
        except PatchCoreError as exc:
            if args.category != "all":
                raise
            failed[category] = str(exc)
            print(f"patchcore evaluate: category {category} failed: {exc}", file=sys.stderr)
            continue
        rows.append(result.metrics)
        print(json.dumps(result.metrics))
    table = summary_table(rows) if rows else "(no category evaluated)"
    if failed:
        table += "\n\nFailed categories:\n" + "\n".join(f"- {c}: {m}" for c, m in failed.items())
    with atomic_write(Path(args.out) / "summary.md") as tmp:
        tmp.write_text(table + "\n")
    _write_json(Path(args.out) / "summary.json", {"categories": rows, "failed": failed})
    print(table)
    print(f"\nresults written under {args.out}")
    return 1 if failed else 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from patchcore_core.demo_data import write_demo_dataset

    path = write_demo_dataset(args.out, seed=args.seed)
    print(f"demo dataset written to {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "demo-data": cmd_demo_data}
    try:
        return handler[args.command](args)
    except PatchCoreError as exc:
        print(f"patchcore {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
