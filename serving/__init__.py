"""Serving a registered PatchCore model: the MLflow pyfunc model (`pyfunc_model.py`, logged as code) and the
production scoring server (`python -m serving`, see `app.py`).

Limits, from the environment: PATCHCORE_SERVE_MAX_REQUEST_BYTES (default 64 MiB), PATCHCORE_SERVE_MAX_IMAGES
(images per request, default 64) and PATCHCORE_MAX_IMAGE_PIXELS (pixels per image, from its header before
decoding, default 50 MP).
"""

import os
from pathlib import Path

from patchcore_core.artifacts import BANK_FILE, CONFIG_FILE, INDEX_FILE

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# pyfunc artifact key → file of the saved model folder; `serving.json` (threshold) travels as key "serving".
PYFUNC_ARTIFACTS = {"config": CONFIG_FILE, "memory_bank": BANK_FILE, "index": INDEX_FILE}
ERROR_PREFIX = "patchcore: "  # client errors raised by the pyfunc model start with this
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_IMAGES = 64


def _positive_int(name: str, default: int) -> int:
    from patchcore_core.errors import ConfigError

    raw = os.environ.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"setting {name}: must be an integer >= 1 (got {raw!r})")
    return int(raw)


def max_request_bytes() -> int:
    return _positive_int("PATCHCORE_SERVE_MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES)


def max_images_per_request() -> int:
    return _positive_int("PATCHCORE_SERVE_MAX_IMAGES", DEFAULT_MAX_IMAGES)
