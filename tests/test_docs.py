"""The real set-up of docs/pipeline.md, command by command (`make docs-check`; marker `docs`, not in `make test`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _docs_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("docs_check", REPO / "scripts" / "docs_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_commands_are_found_and_localised():
    """Cheap, in every run: the check sees the documented commands, each deployment also in its offline form."""
    check = _docs_check()
    commands = check.doc_commands((REPO / "docs" / "pipeline.md").read_text())
    runs = [c for c in commands if c.startswith("prefect deployment run")]
    training = [c for c in runs if "patchcore/score-batch" not in c]  # scoring takes a registered model, no config
    assert training and all('"preset": "offline"' in c and "--watch" in c for c in training), runs
    assert any("patchcore/score-batch" in c and "--watch" in c for c in runs), runs
    assert any(c.startswith("mlflow models serve") for c in commands)
    assert any(c.startswith("export MLFLOW_TRACKING_URI=") for c in commands)
    servers = ("mlflow server", "prefect server start", "prefect worker start", "mlflow models serve", "python infra/")
    assert [c for c in commands if "# terminal" in c and not c.startswith(servers)] == []
    ports = {p: str(40000 + i) for i, p in enumerate(check.FIXED_PORTS)}
    local = [check.localise(c, ports, Path("/tmp/x/runs")) for c in commands]
    assert not any(p in c for c in local for p in check.FIXED_PORTS), local
    assert all("/tmp/x/runs/" in c for c, o in zip(local, commands, strict=True) if "runs/" in o)


@pytest.mark.docs
def test_every_documented_command_runs():
    done = subprocess.run([sys.executable, str(REPO / "scripts" / "docs_check.py")], cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
