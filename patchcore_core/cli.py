"""`patchcore` command line: fit, predict, evaluate, demo-data."""

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


def cmd_fit(args: argparse.Namespace) -> None:
    from patchcore_core.data import list_category

    listing = list_category(args.data, args.category)
    model = _model_from_args(args).fit([s.path for s in listing.train])
    model.save(args.out)
    print(f"saved {type(model).__name__} model to {args.out}")


def cmd_predict(args: argparse.Namespace) -> None:
    import numpy as np
    import pandas as pd

    from patchcore_core.artifacts import atomic_write
    from patchcore_core.baselines import load_detector
    from patchcore_core.runtime import configure_threads

    configure_threads(args.threads)
    model = load_detector(args.model, device=args.device)
    model.set_params(progress=not args.quiet)
    if args.batch_size is not None:
        model.set_params(batch_size=validate_params(batch_size=args.batch_size).batch_size)
    images = expand_images(args.images)
    scores, maps = model.predict(images)
    out = Path(args.out)
    with atomic_write(out / "anomaly_maps.npy") as tmp, open(tmp, "wb") as fh:
        np.save(fh, maps, allow_pickle=False)
    with atomic_write(out / "predictions.parquet") as tmp:
        pd.DataFrame({"path": images, "score": scores}).to_parquet(tmp, index=False)
    for path, score in zip(images, scores, strict=True):
        print(f"{score:.4f}\t{path}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from patchcore_core.artifacts import atomic_write
    from patchcore_core.baselines import load_detector
    from patchcore_core.data import list_categories
    from patchcore_core.evaluation import evaluate_category, summary_table
    from patchcore_core.runtime import configure_threads

    configure_threads(args.threads)
    categories = list_categories(args.data) if args.category == "all" else [args.category]
    if not categories:
        raise PatchCoreError(f"--data {args.data} holds no MVTec-layout category (no <category>/train/good)")
    rows = []
    for category in categories:
        out = Path(args.out) / category if args.category == "all" else Path(args.out)
        if args.model:
            model, fit = load_detector(args.model, device=None if args.device == "auto" else args.device), False
        else:
            model, fit = _model_from_args(args), True
        result = evaluate_category(model, args.data, category, out, fit=fit)
        rows.append(result.metrics)
        print(json.dumps(result.metrics))
    table = summary_table(rows)
    with atomic_write(Path(args.out) / "summary.md") as tmp:
        tmp.write_text(table + "\n")
    print(table)
    print(f"\nresults written under {args.out}")


def cmd_demo_data(args: argparse.Namespace) -> None:
    from patchcore_core.demo_data import write_demo_dataset

    path = write_demo_dataset(args.out, seed=args.seed)
    print(f"demo dataset written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"fit": cmd_fit, "predict": cmd_predict, "evaluate": cmd_evaluate, "demo-data": cmd_demo_data}
    try:
        handler[args.command](args)
    except PatchCoreError as exc:
        print(f"patchcore {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
