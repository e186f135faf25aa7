"""The production scoring server (`python -m serving`, a subprocess on 127.0.0.1 serving a model registered in
MLflow) answers every bad request with a 4xx and one line of JSON: no stack trace, no server path; it limits
request bytes, images per request and pixels; it leaves no temporary files."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.reliability.conftest import FAST, run_cli

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def registered(dataset, tmp_path_factory):
    """A PatchCore fitted by the CLI and registered in a SQLite MLflow as `patchcore-reliability` v1."""
    import mlflow

    from serving import PYFUNC_ARTIFACTS, PYFUNC_CODE
    from tasks.tracking import model_signature

    tmp = tmp_path_factory.mktemp("serving")
    model_dir = tmp / "model"
    from patchcore_core.cli import main

    assert main(["fit", "--data", str(dataset), "--category", "brick", "--out", str(model_dir), *FAST]) == 0
    (tmp / "serving.json").write_text(json.dumps({"threshold": 1.0}))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("reliability", artifact_location=(tmp / "artifacts").as_uri())
    artifacts = {key: str(model_dir / name) for key, name in PYFUNC_ARTIFACTS.items()}
    with mlflow.start_run(experiment_id=experiment):
        mlflow.pyfunc.log_model(name="model", python_model=str(PYFUNC_CODE),
                                artifacts={**artifacts, "serving": str(tmp / "serving.json")},
                                signature=model_signature(1.0), pip_requirements=[],
                                registered_model_name="patchcore-reliability")
    mlflow.set_tracking_uri(None)
    return {"tracking_uri": uri, "tmp": tmp}


@pytest.fixture(scope="module")
def server(registered):
    port = _free_port()
    server_tmp = registered["tmp"] / "server-tmp"
    server_tmp.mkdir()
    env = dict(os.environ, MLFLOW_TRACKING_URI=registered["tracking_uri"], TMPDIR=str(server_tmp),
               PATCHCORE_THREADS="1", PATCHCORE_SERVE_MAX_IMAGES="4", PATCHCORE_SERVE_MAX_REQUEST_BYTES="2000000",
               PYTHONPATH=str(REPO), MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    log = open(registered["tmp"] / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "serving", "--model-uri", "models:/patchcore-reliability/1",
                             "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise AssertionError((registered["tmp"] / "server.log").read_text()[-3000:])
        try:
            with urllib.request.urlopen(f"{base}/ping", timeout=2):
                break
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    yield {"base": base, "tmp": server_tmp, "log": registered["tmp"] / "server.log"}
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(30)
    log.close()


def _png(size=(80, 80), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 0 if mode == "1" else (120, 90, 60)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _post(base: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:
    request = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raw = err.read()
        return err.code, json.loads(raw)


def _images(*blobs) -> bytes:
    rows = [[None if b is None else base64.b64encode(b).decode() if isinstance(b, bytes) else b] for b in blobs]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def _clean(status: int, body: dict, server) -> str:
    """A client error: 4xx, exactly error_code + message, one line, nothing about the server inside."""
    assert 400 <= status < 500, (status, body)
    assert set(body) == {"error_code", "message"}, body
    message = body["message"]
    assert "\n" not in message and "Traceback" not in message and "stack" not in json.dumps(body)
    for leak in (str(REPO), str(server["tmp"]), "site-packages", "/tmp/", ".py\""):
        assert leak not in message, (leak, message)
    return message


def test_good_request_is_scored(server, dataset):
    images = sorted((dataset / "brick" / "test").rglob("*.png"))[:2]
    status, body = _post(server["base"], _images(*(p.read_bytes() for p in images)))
    assert status == 200 and len(body["predictions"]) == 2
    assert {"score", "is_anomalous"} <= set(body["predictions"][0])


@pytest.mark.parametrize(("blobs", "expected"), [
    ((b"this is not an image",), "corrupt or unreadable image #0"),
    ((None,), "Failed to convert column image"),  # MLflow's signature check refuses it before the model
    (("@@not base64@@",), "Invalid base64-encoded string"),  # also refused by MLflow's signature check
    ((_png((1, 1)),), "image #0: 1x1 px is smaller than the minimum side of 32 px"),
    ((_png((13000, 13000), "1"),), "image #0: 13000x13000 px = 169.0 MP exceeds the limit of 50 MP"),
    ((_png(),) * 5, "5 images in one request; the limit is 4 (PATCHCORE_SERVE_MAX_IMAGES)"),
])
def test_bad_images_get_a_clean_400(server, blobs, expected):
    status, body = _post(server["base"], _images(*blobs))
    assert status == 400
    assert expected in _clean(status, body, server)


def test_malformed_requests_get_a_clean_4xx(server):
    status, body = _post(server["base"], b"{not json")
    _clean(status, body, server)
    status, body = _post(server["base"], json.dumps({"dataframe_split": {"columns": ["pixels"], "data": [[1]]}})
                         .encode())
    _clean(status, body, server)


def _raw_request(base: str, headers: dict[str, str], body: bytes | None = None) -> tuple[int, dict]:
    """A POST whose headers say what the test wants; the response is read before any body is sent, as a server
    that refuses by its headers answers at once (a client still sending would see a broken pipe)."""
    import http.client
    from urllib.parse import urlparse

    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    conn.putrequest("POST", "/invocations")
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders()
    if body is not None:
        conn.send(body)
    response = conn.getresponse()
    status, payload = response.status, json.loads(response.read())
    conn.close()
    return status, payload


def test_request_size_is_limited_before_the_body_is_read(server):
    status, body = _raw_request(server["base"], {"Content-Type": "application/json", "Content-Length": "3000000"})
    assert status == 413 and body["error_code"] == "REQUEST_TOO_LARGE"
    assert "the request is 3000000 bytes; the limit is 2000000 (PATCHCORE_SERVE_MAX_REQUEST_BYTES)" in _clean(
        status, body, server)


def test_a_request_without_length_is_refused(server):
    status, body = _raw_request(server["base"], {"Content-Type": "application/json",
                                                 "Transfer-Encoding": "chunked"}, b"0\r\n\r\n")
    assert status == 411 and "Content-Length header is required" in _clean(status, body, server)


def test_no_temporary_files_are_left(server, dataset):
    image = sorted((dataset / "brick" / "test").rglob("*.png"))[0].read_bytes()
    for _ in range(3):
        assert _post(server["base"], _images(image))[0] == 200
    _post(server["base"], _images(b"junk"))
    left = [p.name for p in server["tmp"].iterdir() if p.name.startswith("patchcore")]
    assert left == [], left
    assert "Traceback" not in server["log"].read_text() or "unhandled" in server["log"].read_text()


def test_cli_fit_for_reference_is_unaffected(capsys, dataset, tmp_path):
    """Serving's checks are the CLI's checks: the same 1x1 image is refused the same way by `predict`."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "dot.png").write_bytes(_png((1, 1)))
    model = tmp_path / "m"
    assert run_cli(capsys, "fit", "--data", dataset, "--category", "brick", "--out", model, *FAST)[0] == 0
    code, _, err = run_cli(capsys, "predict", "--model", model, "--images", tmp_path / "in", "--out", tmp_path / "o")
    assert code == 2 and "1x1 px is smaller than the minimum side of 32 px" in err
