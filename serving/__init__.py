"""Serving a registered PatchCore model: the MLflow pyfunc model (`pyfunc_model.py`, logged as code)."""

from pathlib import Path

from patchcore_core.artifacts import BANK_FILE, CONFIG_FILE, INDEX_FILE

PYFUNC_CODE = Path(__file__).with_name("pyfunc_model.py")
# pyfunc artifact key → file of the saved model folder; `serving.json` (threshold) travels as key "serving".
PYFUNC_ARTIFACTS = {"config": CONFIG_FILE, "memory_bank": BANK_FILE, "index": INDEX_FILE}
