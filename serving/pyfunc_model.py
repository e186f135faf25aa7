"""The MLflow pyfunc model of a trained PatchCore, logged as code (models-from-code: no pickled model).

MLflow copies this file into the logged model; the fitted state comes from the model's artifacts:
`config` (config.json), `memory_bank` (memory_bank.npy: the coreset), `index` (index.faiss) and `serving`
(serving.json). Input: a DataFrame with a binary column `image` (encoded PNG/JPEG bytes; base64 in JSON
requests). Output: `score` (image anomaly score), `threshold` (the model's calibrated threshold, set on
held-out nominal train images; a positive `threshold` param overrides it) and `is_anomalous`; with the param
`return_mask=true`, also `mask`: a base64 PNG of the binary mask at the input image's resolution.

A bad request (no `image` column, a null or undecodable image, too many images or pixels) raises an
`MlflowException` with error code INVALID_PARAMETER_VALUE (HTTP 400) whose message starts with
`patchcore: ` and names the image by its position, never a server path. Images are decoded from memory:
no temporary files.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import os
import shutil
import tempfile

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from serving import ERROR_PREFIX, PYFUNC_ARTIFACTS, max_images_per_request


def bad_request(message: str) -> MlflowException:
    """A client error with a one-line message (HTTP 400)."""
    return MlflowException(f"{ERROR_PREFIX}{message}", error_code=INVALID_PARAMETER_VALUE)


class PatchCorePyfunc(PythonModel):
    """Scores images with a saved PatchCore model (`patchcore_core.PatchCore.load`)."""

    def load_context(self, context) -> None:
        from patchcore_core.model import PatchCore

        # PatchCore.load reads one folder (and verifies each file's sha256): link the artifacts into one,
        # wherever MLflow put them; the model holds everything in memory afterwards, so the folder goes.
        folder = tempfile.mkdtemp(prefix="patchcore-pyfunc-")
        try:
            for key, name in PYFUNC_ARTIFACTS.items():
                os.symlink(os.path.abspath(context.artifacts[key]), os.path.join(folder, name))
            self.model = PatchCore.load(folder, device=os.environ.get("PATCHCORE_DEVICE", "cpu"))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.model.set_params(progress=False)
        with open(context.artifacts["serving"]) as fh:
            self.serving = json.load(fh)

    def _images(self, model_input: pd.DataFrame):
        """(the request's images as one preprocessed tensor [N,3,S,S], their (width, height)); each image is
        checked before it is decoded."""
        import torch

        from patchcore_core.data import decode_bytes, image_tensor
        from patchcore_core.errors import PatchCoreError

        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise bad_request("the request needs a column named 'image' (base64-encoded PNG/JPEG bytes)")
        values = list(model_input["image"])
        limit = max_images_per_request()
        if not values:
            raise bad_request("the request holds no image")
        if len(values) > limit:
            raise bad_request(f"{len(values)} images in one request; the limit is {limit} "
                              "(PATCHCORE_SERVE_MAX_IMAGES)")
        tensors, sizes = [], []
        for i, value in enumerate(values):
            name = f"#{i}"
            if value is None or (isinstance(value, float) and math.isnan(value)):
                raise bad_request(f"image {name} is null")
            if isinstance(value, bytes | bytearray):
                data = bytes(value)
            elif isinstance(value, str):
                try:
                    data = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise bad_request(f"image {name} is not valid base64") from None
            else:
                raise bad_request(f"image {name} must be base64-encoded image bytes, not {type(value).__name__}")
            try:
                img = decode_bytes(data, name, min_side=True)
                sizes.append(img.size)
                tensors.append(image_tensor(img, name, self.model.resize, self.model.image_size))
            except PatchCoreError as exc:
                raise bad_request(str(exc)) from None
        return torch.stack(tensors), sizes

    def threshold(self, params: dict | None) -> float:
        """A positive `threshold` param, else the model's calibrated threshold, else serving.json's."""
        given = float((params or {}).get("threshold") or 0.0)
        if given > 0:
            return given
        calibrated = getattr(self.model, "threshold_", None)
        return float(calibrated if calibrated is not None else self.serving["threshold"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        threshold = self.threshold(params)
        images, sizes = self._images(model_input)
        scores, maps = self.model.predict(images)
        out = pd.DataFrame({"score": scores.astype("float32"), "threshold": np.float32(threshold),
                            "is_anomalous": scores >= threshold})
        if (params or {}).get("return_mask"):
            out["mask"] = [self._mask_png(amap, size) for amap, size in zip(maps, sizes, strict=True)]
        return out

    def _mask_png(self, amap: np.ndarray, size: tuple[int, int]) -> str:
        """The binary mask (pixel threshold) at the input resolution, as a base64 PNG."""
        from PIL import Image

        from patchcore_core.prediction import to_input_resolution

        pixel_threshold = getattr(self.model, "pixel_threshold_", None)
        if pixel_threshold is None:
            raise bad_request("this model has no calibrated pixel threshold: masks are not available")
        full = to_input_resolution(amap, size, self.model.resize, self.model.image_size)
        buf = io.BytesIO()
        Image.fromarray(((full >= pixel_threshold) * 255).astype(np.uint8), "L").save(buf, "PNG")
        return base64.b64encode(buf.getvalue()).decode()


mlflow.models.set_model(PatchCorePyfunc())
