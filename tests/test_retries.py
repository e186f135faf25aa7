"""Retries only for transient I/O: bad images, bad data and missing weights fail at once (one attempt) in a real
flow run; the retry rule itself on the errors the libraries raise."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image, UnidentifiedImageError

from patchcore_core.config import DetectorParams
from patchcore_core.errors import DataError, WeightsUnavailableError
from tasks.common import is_transient_io_error

STAGES = {"fetch", "extract", "coreset", "index", "score", "metrics", "baseline"}
CONFIG = DetectorParams(backbone="efficientnet_lite0", resize=72, image_size=64, coreset_ratio=0.25, batch_size=4)


def _chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise outer from exc
    except BaseException as exc:  # noqa: BLE001
        return exc


@pytest.mark.parametrize(("error", "transient"), [
    (ConnectionResetError("reset by peer"), True),
    (TimeoutError("read timed out"), True),
    (OSError(5, "Input/output error"), True),  # a disk error
    (_chained(DataError("cannot list s3://b/c"), ConnectionRefusedError("refused")), True),
    (type("EndpointConnectionError", (Exception,), {})("endpoint down"), True),
    (UnidentifiedImageError("cannot identify image file"), False),
    (_chained(DataError("corrupt image x.png"), UnidentifiedImageError("cannot identify")), False),
    (_chained(DataError("corrupt image x.png"), OSError("image file is truncated")), False),
    (_chained(DataError("corrupt image x.png"), SyntaxError("broken PNG file")), False),
    (DataError("category 'nope' not found"), False),
    (WeightsUnavailableError("no weights"), False),
    (FileNotFoundError("gone"), False),
    (ValueError("bad setting"), False),
])
def test_retry_rule(error, transient):
    assert is_transient_io_error(error) is transient


def _failed_stage_attempts(flow_run_id) -> dict[str, int]:
    """{task run name: attempts} of every failed task run in the flow run and its subflows."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        ids, frontier, tasks = [flow_run_id], [flow_run_id], []
        while frontier:
            found = client.read_task_runs(task_run_filter=TaskRunFilter(
                flow_run_id=TaskRunFilterFlowRunId(any_=frontier)), limit=200)
            tasks += found
            parents = FlowRunFilterParentTaskRunId(any_=[t.id for t in found])
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=parents),
                                             limit=200) if found else []
            frontier = [c.id for c in children if c.id not in ids]
            ids += frontier
        failed = {t.name: t for t in tasks if t.state and t.state.is_failed() and t.name.split("-")[0] in STAGES}
        history = {name: [s.name for s in client.read_task_run_states(t.id)] for name, t in failed.items()}
    assert all("Retrying" not in h and "AwaitingRetry" not in h for h in history.values()), history
    return {name: t.run_count for name, t in failed.items()}


def _run(data_url: str, categories: list[str], config: DetectorParams, work: Path):
    from flows.patchcore import full_benchmark

    state = full_benchmark(data_url, categories, config, str(work), register_models=False, return_state=True)
    assert state.is_failed()
    return state


@pytest.mark.usefixtures("prefect_harness")
def test_permanent_errors_fail_at_once_in_a_flow_run(pipeline_env, pipeline_dataset, tmp_path):
    work = pipeline_env["work_dir"]

    # An image that does not decode (right name, garbage bytes): a decode error, never retried.
    broken = tmp_path / "broken-src"
    shutil.copytree(pipeline_dataset / "brick", broken / "brick")
    (broken / "brick" / "train" / "good" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png" * 20)
    state = _run(str(broken), ["brick"], CONFIG, work)
    attempts = _failed_stage_attempts(state.state_details.flow_run_id)
    assert attempts and set(attempts.values()) == {1}, attempts
    assert "001.png" in state.message or "1 of 1 categories failed" in state.message

    # Bad data: a category the dataset does not have.
    state = _run(str(pipeline_dataset), ["no-such-category"], CONFIG, work)
    attempts = _failed_stage_attempts(state.state_details.flow_run_id)
    assert attempts == {"fetch-no-such-category": 1}, attempts

    # Missing weights: a weights file that does not exist.
    missing = CONFIG.model_copy(update={"weights": str(tmp_path / "no-such-weights.pth")})
    state = _run(str(pipeline_dataset), ["brick"], missing, work)
    attempts = _failed_stage_attempts(state.state_details.flow_run_id)
    assert attempts and set(attempts.values()) == {1} and all(n.startswith("extract-") for n in attempts), attempts


def test_a_broken_png_is_a_pillow_decode_error(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png" * 20)
    with pytest.raises(Exception) as info:  # noqa: PT011 - whichever error Pillow picks
        Image.open(bad).convert("RGB")
    assert not is_transient_io_error(info.value)
