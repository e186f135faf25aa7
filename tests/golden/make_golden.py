"""Write tests/golden/demo_scores.json: exact scores and map digests of the detectors on a small demo category.

Run once before a behaviour-preserving refactor (`python tests/golden/make_golden.py`); `tests/test_golden.py`
then asserts that the refactored code gives the same float32 scores and anomaly maps bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("PATCHCORE_THREADS", "1")

GOLDEN = Path(__file__).with_name("demo_scores.json")
BASE = dict(backbone="efficientnet_lite0", resize=72, image_size=64, batch_size=4, seed=0, device="cpu",
            num_threads=1, progress=False)
CASES = {
    "patchcore": ("patchcore", dict(coreset_ratio=0.25)),
    "patchcore_eq7_knn3": ("patchcore", dict(coreset_ratio=0.25, num_neighbors=3, reweight_neighbors=3)),
    "patchcore_random_sq": ("patchcore", dict(coreset_ratio=0.5, coreset_method="random", distance="squared_l2")),
    "spade": ("spade", dict(k_images=3)),
    "padim": ("padim", dict()),
}


def demo_category(root: Path):
    from patchcore_core.data import list_category
    from patchcore_core.demo_data import write_demo_dataset

    data = write_demo_dataset(root / "mvtec-mini", categories=["brick"], seed=0, n_train=8, n_test_good=3,
                              n_test_defect=3, size=80)
    return list_category(str(data), "brick")


def run_case(method: str, params: dict, listing) -> dict:
    from patchcore_core.baselines import make_detector

    model = make_detector(method, **BASE, **params)
    model.fit([s.path for s in listing.train])
    scores, maps = model.predict([s.path for s in listing.test])
    scores = np.asarray(scores, np.float32)
    maps = np.ascontiguousarray(maps, np.float32)
    return {
        "scores_hex": [float(s).hex() for s in scores],
        "maps_sha256": hashlib.sha256(maps.tobytes()).hexdigest(),
        "maps_shape": list(maps.shape),
    }


def compute() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        listing = demo_category(Path(tmp))
        return {name: run_case(method, params, listing) for name, (method, params) in CASES.items()}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(compute(), indent=1) + "\n")
    print(f"wrote {GOLDEN}")
    sys.exit(0)
