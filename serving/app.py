"""The production scoring server: MLflow's scoring app for a registered PatchCore model, behind a guard that
enforces the request-size limit and turns every error into one line of JSON.

`mlflow models serve` answers bad requests with the request data and the server's stack trace in the body; this
app answers `{"error_code": ..., "message": "<one line>"}` with a 4xx status for client errors, and never a
stack trace or a server path. Same endpoints and request formats as MLflow's (`/invocations`, `/ping`,
`/health`, `/version`)::

    python -m serving --model-uri models:/patchcore-bottle@champion --host 127.0.0.1 --port 5001
"""

from __future__ import annotations

import json
import logging

from serving import ERROR_PREFIX, max_request_bytes

log = logging.getLogger("patchcore.serving")

STATUS_CODES = {400: "BAD_REQUEST", 404: "NOT_FOUND", 411: "LENGTH_REQUIRED", 413: "REQUEST_TOO_LARGE",
                415: "UNSUPPORTED_MEDIA_TYPE", 500: "INTERNAL_ERROR", 504: "TIMEOUT"}


def one_line(message: str) -> str:
    """The client-facing part of an error message: ours after its prefix, else the first line, bounded."""
    if ERROR_PREFIX in message:
        message = message.split(ERROR_PREFIX, 1)[1]
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "request failed")[:300]


def _error(status: int, message: str, code: str | None = None):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error_code": code or STATUS_CODES.get(status, "ERROR"), "message": message},
                        status_code=status)


def create_app(model_uri: str):
    """Load `model_uri` (e.g. models:/patchcore-bottle@champion) and return the guarded scoring app."""
    import mlflow.pyfunc
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(mlflow.pyfunc.load_model(model_uri))
    limit = max_request_bytes()

    @app.middleware("http")
    async def guard(request, call_next):  # added last, so it runs first
        if request.method == "POST":
            length = request.headers.get("content-length")
            if length is None or not length.isdigit():
                return _error(411, "a Content-Length header is required")
            if int(length) > limit:
                return _error(413, f"the request is {int(length)} bytes; the limit is {limit} "
                                   "(PATCHCORE_SERVE_MAX_REQUEST_BYTES)")
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - logged here, never sent to the client
            log.exception("unhandled error while serving %s", request.url.path)
            return _error(500, "internal error while scoring the request")
        if response.status_code < 400:
            return response
        body = b"".join([chunk async for chunk in response.body_iterator])
        try:
            payload = json.loads(body)
            message, code = payload.get("message", ""), payload.get("error_code")
        except (ValueError, AttributeError):
            message, code = body.decode("utf-8", "replace"), None
        if response.status_code >= 500:
            log.error("scoring failed (%s): %s", response.status_code, message)
            message = "internal error while scoring the request" if response.status_code == 500 else message
        return _error(response.status_code, one_line(message), code if response.status_code < 500 else None)

    return app


def main(argv: list[str] | None = None) -> int:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m serving", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="models:/patchcore-<category>@champion, or a version")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    args = parser.parse_args(argv)
    uvicorn.run(create_app(args.model_uri), host=args.host, port=args.port, log_level="info")
    return 0
