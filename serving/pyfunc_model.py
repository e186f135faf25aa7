"""The MLflow pyfunc model of a trained PatchCore, logged as code (models-from-code: no pickled model).

MLflow copies this file into the logged model; the fitted state comes from the model's artifacts:
`config` (config.json), `memory_bank` (memory_bank.npy: the coreset), `index` (index.faiss) and `serving`
(serving.json: the decision threshold). Input: a DataFrame with a binary column `image` (encoded PNG/JPEG
bytes; base64 in JSON requests). Output: `score` (image anomaly score) and `is_anomalous` (score >= threshold).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

from serving import PYFUNC_ARTIFACTS


class PatchCorePyfunc(PythonModel):
    """Scores images with a saved PatchCore model (`patchcore_core.PatchCore.load`)."""

    def load_context(self, context) -> None:
        from patchcore_core.model import PatchCore

        # PatchCore.load reads one folder: link the three artifacts into one, wherever MLflow put them.
        self._dir = tempfile.mkdtemp(prefix="patchcore-pyfunc-")
        for key, name in PYFUNC_ARTIFACTS.items():
            os.symlink(os.path.abspath(context.artifacts[key]), os.path.join(self._dir, name))
        self.model = PatchCore.load(self._dir, device=os.environ.get("PATCHCORE_DEVICE", "cpu"))
        self.model.progress = False
        with open(context.artifacts["serving"]) as fh:
            self.serving = json.load(fh)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        import base64

        threshold = float((params or {}).get("threshold") or self.serving["threshold"])
        work = tempfile.mkdtemp(prefix="patchcore-request-")
        try:
            paths = []
            for i, value in enumerate(model_input["image"]):
                data = value if isinstance(value, bytes | bytearray) else base64.b64decode(value)
                path = os.path.join(work, f"{i:06d}.img")
                with open(path, "wb") as fh:
                    fh.write(data)
                paths.append(path)
            scores, _ = self.model.predict(paths)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return pd.DataFrame({"score": scores.astype("float32"), "is_anomalous": scores >= threshold})


mlflow.models.set_model(PatchCorePyfunc())
