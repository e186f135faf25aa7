"""The pyfunc model's own checks (what any MLflow runtime calls): clean one-line errors naming the image by
position, and no temporary folder left after loading."""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image


class _Context:
    def __init__(self, artifacts):
        self.artifacts = artifacts


@pytest.fixture(scope="module")
def pyfunc(model_dir, tmp_path_factory):
    import importlib

    from serving import PYFUNC_ARTIFACTS

    tmp = tmp_path_factory.mktemp("pyfunc")
    (tmp / "serving.json").write_text(json.dumps({"threshold": 1.0}))
    before = set(Path(tempfile.gettempdir()).glob("patchcore-pyfunc-*"))
    module = importlib.import_module("serving.pyfunc_model")
    model = module.PatchCorePyfunc()
    model.load_context(_Context({**{k: str(model_dir / n) for k, n in PYFUNC_ARTIFACTS.items()},
                                 "serving": str(tmp / "serving.json")}))
    assert set(Path(tempfile.gettempdir()).glob("patchcore-pyfunc-*")) == before, "load left a temporary folder"
    return model


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize(("frame", "expected"), [
    (pd.DataFrame({"pixels": [b"x"]}), "the request needs a column named 'image'"),
    (pd.DataFrame({"image": [None]}), "image #0 is null"),
    (pd.DataFrame({"image": [float("nan")]}), "image #0 is null"),
    (pd.DataFrame({"image": ["%%%"]}), "image #0 is not valid base64"),
    (pd.DataFrame({"image": [12]}), "image #0 must be base64-encoded image bytes, not int"),
    (pd.DataFrame({"image": [_png((64, 64)), b"junk"]}), "corrupt or unreadable image #1"),
    (pd.DataFrame({"image": [_png((64, 20))]}), "image #0: 64x20 px is smaller than the minimum side of 32 px"),
    (pd.DataFrame({"image": []}), "the request holds no image"),
])
def test_bad_inputs_raise_a_one_line_client_error(pyfunc, frame, expected):
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as err:
        pyfunc.predict(None, frame)
    assert err.value.get_http_status_code() == 400
    assert err.value.message == f"patchcore: {err.value.message.removeprefix('patchcore: ')}"
    assert expected in err.value.message and "\n" not in err.value.message


def test_good_input_is_scored_with_the_calibrated_threshold(pyfunc, dataset):
    import base64

    import numpy as np

    paths = sorted((dataset / "brick" / "test").rglob("*.png"))[:3]
    out = pyfunc.predict(None, pd.DataFrame({"image": [p.read_bytes() for p in paths]}))
    assert list(out.columns) == ["score", "threshold", "is_anomalous"] and len(out) == 3
    assert out["threshold"].iloc[0] == np.float32(pyfunc.model.threshold_)  # not serving.json's 1.0
    assert (out["is_anomalous"] == (out["score"] >= pyfunc.model.threshold_)).all()
    forced = pyfunc.predict(None, pd.DataFrame({"image": [paths[0].read_bytes()]}), {"threshold": 1e9})
    assert not forced["is_anomalous"].iloc[0] and forced["threshold"].iloc[0] == np.float32(1e9)
    masked = pyfunc.predict(None, pd.DataFrame({"image": [paths[0].read_bytes()]}), {"return_mask": True})
    mask = Image.open(io.BytesIO(base64.b64decode(masked["mask"].iloc[0])))
    assert mask.size == Image.open(paths[0]).size and mask.mode == "L"
