"""The servers of the real set-up (docs/pipeline.md) as subprocesses on 127.0.0.1, for tests and the docs check.

`PrefectServer` runs `prefect server start` with its own PREFECT_HOME (its own SQLite database) and analytics
off; `MlflowServer` runs `mlflow server` on SQLite with served artifacts; `Process` runs any other command
(a worker, `mlflow models serve`) in its own process group with its output in a log file. Every `stop()`
SIGTERMs the process group and SIGKILLs it after a timeout. Ports are free loopback ports unless given.

Loaded by path (infra/ is a folder of scripts, not an installed package)::

    spec = importlib.util.spec_from_file_location("local_servers", "infra/local_servers.py")
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
# What every server and client we start gets: no usage telemetry from Prefect or MLflow, no progress bars.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",  # MLflow reads "true" only; Prefect any value
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "TQDM_DISABLE": "1",
}


def free_port(host: str = HOST) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None, timeout: float, log: Path | None = None) -> None:
    """Until `url` answers 200; raises with the log tail when the process exits or the time is up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:3]} exited with {proc.returncode}\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not answering after {timeout:.0f}s\n{tail(log)}")


def stop_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM a process started with `start_new_session=True` and its whole group; SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def tail(path: Path | None, n: int = 40) -> str:
    if path is None:
        return ""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Process:
    """One command in its own process group, output to `log`; `stop()` ends the whole group."""

    def __init__(self, args: list[str], log: str | os.PathLike, env: dict[str, str] | None = None,
                 cwd: str | os.PathLike | None = None) -> None:
        self.args, self.log, self.env, self.cwd = args, Path(log), env, cwd
        self.proc: subprocess.Popen | None = None

    def start(self) -> Process:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        return tail(self.log, n)

    def stop(self, timeout: float = 20.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            stop_group(proc, timeout)
        else:  # the leader exited: end whatever it left behind in its group
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PrefectServer(Process):
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; `env` is what a client or worker needs."""

    def __init__(self, home: str | os.PathLike, port: int | None = None, extra_env: dict[str, str] | None = None):
        self.home = Path(home)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}/api"
        env = {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home), **(extra_env or {})}
        env.pop("PREFECT_API_URL", None)
        super().__init__([str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(self.port)],
                         self.home / "server.log", env=env)

    @property
    def client_env(self) -> dict[str, str]:
        """Environment for a CLI call, a worker or a flow against this server (its own PREFECT_HOME)."""
        return {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home / "client"), "PREFECT_API_URL": self.url}

    def start(self, timeout: float = 180.0) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        super().start()
        wait_http(f"{self.url}/health", self.proc, timeout, self.log)
        return self

    def cli(self, *args: str, timeout: float = 300, cwd: str | os.PathLike | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """`prefect --no-prompt ARGS` against this server; raises with its output on a non-zero exit."""
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], env={**self.client_env, **(env or {})},
                              cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"prefect {' '.join(args)} -> {done.returncode}\n{done.stdout[-3000:]}\n"
                               f"{done.stderr[-3000:]}")
        return done


class MlflowServer(Process):
    """`mlflow server` on SQLite with artifacts served through it (`--artifacts-destination`)."""

    def __init__(self, root: str | os.PathLike, port: int | None = None):
        self.root = Path(root)
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {**os.environ, **QUIET_ENV}
        env.pop("MLFLOW_TRACKING_URI", None)
        super().__init__([str(BIN / "mlflow"), "server", "--backend-store-uri",
                          f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination",
                          str(self.root / "artifacts"), "--host", HOST, "--port", str(self.port), "--workers", "1"],
                         self.root / "server.log", env=env, cwd=self.root)

    def start(self, timeout: float = 180.0) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        super().start()
        wait_http(f"{self.url}/health", self.proc, timeout, self.log)
        return self
