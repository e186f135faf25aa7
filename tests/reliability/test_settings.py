"""Every setting is checked at the entry points, from the one schema, before any I/O: one line naming the
setting and its range, exit code 2, nothing written, nothing clamped."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.reliability.conftest import FAST, files_under, run_cli

MISSING_DATA = "/nonexistent/dataset/root"  # settings must fail first: the data is never looked at


@pytest.mark.parametrize(("flags", "expected"), [
    (["--image-size", "7"], "setting image_size: Input should be greater than or equal to 32 (got 7)"),
    (["--image-size", "0"], "setting image_size: Input should be greater than or equal to 32 (got 0)"),
    (["--coreset-ratio", "0"], "setting coreset_ratio: Input should be greater than 0 (got 0.0)"),
    (["--coreset-ratio", "-1"], "setting coreset_ratio: Input should be greater than 0 (got -1.0)"),
    (["--coreset-ratio", "1.5"], "setting coreset_ratio: Input should be less than or equal to 1 (got 1.5)"),
    (["--coreset-ratio", "nan"], "setting coreset_ratio: must be a finite number in (0, 1] (got nan)"),
    (["--batch-size", "0"], "setting batch_size: Input should be greater than or equal to 1 (got 0)"),
    (["--resize", "0"], "setting resize: Input should be greater than or equal to 32 (got 0)"),
    (["--num-neighbors", "0"], "setting num_neighbors: Input should be greater than or equal to 1 (got 0)"),
    (["--image-size", "400", "--resize", "256"], "setting resize: must be >= image_size (400)"),
    (["--threads", "0"], "setting threads: must be an integer >= 1 (got 0)"),
    (["--device", "tpu"], "setting device: must be auto, cpu, cuda or cuda:N (got 'tpu')"),
    (["--max-pixels", "10"], "setting PATCHCORE_MAX_IMAGE_PIXELS: must be an integer >= 1024 (got '10')"),
])
@pytest.mark.parametrize("command", ["fit", "evaluate"])
def test_bad_setting_is_one_line_exit_2_before_any_io(capsys, tmp_path, monkeypatch, command, flags, expected):
    monkeypatch.delenv("PATCHCORE_MAX_IMAGE_PIXELS", raising=False)
    out = tmp_path / "out"
    argv = [command, "--data", MISSING_DATA, "--category", "brick", "--out", out,
            "--backbone", "efficientnet_lite0", "--quiet", *flags]
    code, stdout, stderr = run_cli(capsys, *argv)
    assert code == 2
    assert stderr.startswith(f"patchcore {command}: error: {expected}") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and not out.exists()


def test_console_script_reports_a_bad_setting_the_same_way(tmp_path):
    """The installed `patchcore` command, as a user runs it."""
    patchcore = str(__import__("pathlib").Path(sys.executable).with_name("patchcore"))
    done = subprocess.run([patchcore, "fit", "--data", MISSING_DATA, "--category", "x", "--out", str(tmp_path / "m"),
                           "--coreset-ratio", "1.5"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == ("patchcore fit: error: setting coreset_ratio: Input should be less than or equal to 1 "
                           "(got 1.5)\n")
    assert not files_under(tmp_path)


def test_predict_batch_size_and_threads_are_checked(capsys, model_dir, dataset, tmp_path):
    out = tmp_path / "scores"
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--images", dataset / "brick" / "test",
                           "--out", out, "--batch-size", "0")
    assert code == 2 and "setting batch_size: Input should be greater than or equal to 1 (got 0)" in err
    code, _, err = run_cli(capsys, "predict", "--model", model_dir, "--images", dataset / "brick" / "test",
                           "--out", out, "--threads", "-3")
    assert code == 2 and "setting threads: must be an integer >= 1 (got -3)" in err
    assert not out.exists()


def test_library_validates_in_fit_with_the_same_message():
    import torch

    from patchcore_core.errors import ConfigError
    from patchcore_core.model import PatchCore

    model = PatchCore(backbone="efficientnet_lite0", image_size=400, resize=256, device="cpu")
    with pytest.raises(ConfigError, match=r"^setting resize: must be >= image_size \(400\)"):
        model.fit(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="setting num_neighbors"):
        PatchCore(num_neighbors=0).fit_features(np.zeros((4, 8), np.float32), (2, 2))


def test_flow_config_is_validated_by_the_schema():
    """The flows' `config` is the same schema: a deployment parameter out of range is refused by name."""
    from pydantic import ValidationError

    from patchcore_core.config import DetectorParams

    with pytest.raises(ValidationError, match="coreset_ratio"):
        DetectorParams.model_validate({"coreset_ratio": 0})
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DetectorParams.model_validate({"indices": ["flat"]})


def test_settings_that_work_are_not_refused(capsys, dataset, tmp_path):
    out = tmp_path / "m"
    code, stdout, _ = run_cli(capsys, "fit", "--data", dataset, "--category", "gravel", "--out", out, *FAST)
    assert code == 0 and "saved PatchCore model" in stdout and (out / "config.json").is_file()
